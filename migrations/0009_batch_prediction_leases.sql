-- Batch predictions outlive the process that started them. The process running one holds a
-- lease and renews it while it works; a batch left `running` whose lease ran out (or that never
-- had one: rows from before this migration) is claimed again by any server, which predicts the
-- videos that have no result yet. `canceled` stops a batch between two videos.

alter table batch_predictions
    add column lease_owner      uuid,
    add column lease_expires_at timestamptz;

alter table batch_predictions drop constraint batch_predictions_state_check;
alter table batch_predictions add constraint batch_predictions_state_check
    check (state in ('running', 'succeeded', 'failed', 'canceled'));

-- `done` counts the stored results: a video predicted twice (by a process that lost its lease
-- and the one that took over) is one result and counted once.
update batch_predictions b
   set done = (select count(*) from batch_prediction_results r where r.batch_id = b.id);

create index batch_predictions_unfinished on batch_predictions (lease_expires_at)
    where state = 'running';
