-- Predictions over every video of a dataset, run in the background.

create table batch_predictions (
    id          uuid primary key,
    tenant_id   uuid not null references tenants (id),
    model_id    uuid not null references models (id) on delete cascade,
    dataset_id  uuid not null references datasets (id) on delete cascade,
    split       text,
    clips       integer not null,
    state       text not null default 'running'
                check (state in ('running', 'succeeded', 'failed')),
    error       text,
    total       integer not null default 0,
    done        integer not null default 0,
    created_at  timestamptz not null default now(),
    finished_at timestamptz
);
create index batch_predictions_tenant on batch_predictions (tenant_id, created_at desc);

create table batch_prediction_results (
    batch_id       uuid not null references batch_predictions (id) on delete cascade,
    video_id       uuid not null,
    path           text not null,
    truth          text,
    predicted      text not null,
    probability    double precision not null,
    probabilities  jsonb not null,
    primary key (batch_id, video_id)
);
