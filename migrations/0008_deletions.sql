-- Deletion and retention: what a tenant deletes leaves no bytes behind, and what was trained on
-- it keeps its lineage.
--
-- A deletion removes the database rows at once and records, in the same transaction, the files
-- still to be removed. A server removes them in the background and at start-up finishes any a
-- previous process left pending, so a crash between the two leaves work to resume, never a
-- forgotten file. Rows are kept once completed: together with audit_events they say who deleted
-- what and when the bytes were gone.
create table deletions (
    id            uuid primary key,
    -- No foreign keys: the tenant, the key and the resource may all be gone.
    tenant_id     uuid not null,
    kind          text not null check (kind in ('dataset', 'model', 'base_model', 'tenant')),
    resource_id   uuid not null,
    key_id        uuid,
    request_id    text,
    -- Files and folders to remove, relative to the data directory.
    paths         text[] not null,
    requested_at  timestamptz not null default now(),
    completed_at  timestamptz,
    -- The last removal failure, while it is retried.
    error         text
);
create index deletions_pending on deletions (requested_at) where completed_at is null;
create index deletions_tenant on deletions (tenant_id, requested_at desc);

-- Jobs and models keep the id of the dataset they were trained on after it is deleted (lineage),
-- so the id is no longer a foreign key; what the dataset was is copied in when it goes.
alter table jobs drop constraint jobs_dataset_id_fkey;
alter table jobs add column dataset_lineage jsonb;
alter table models add column dataset_lineage jsonb;

-- What the foreign key guaranteed on insert still holds: a job is created only on a dataset that
-- exists. The share lock waits for a deletion in progress (which holds the dataset's row lock)
-- and then finds the row gone.
create or replace function jobs_dataset_exists() returns trigger as $$
begin
    perform 1 from datasets where id = new.dataset_id for key share;
    if not found then
        raise exception 'dataset % does not exist', new.dataset_id
            using errcode = 'foreign_key_violation';
    end if;
    return new;
end;
$$ language plpgsql;
create trigger jobs_dataset_exists before insert on jobs
    for each row execute function jobs_dataset_exists();

-- This database's identity. The data directory holds a copy (`.vidtune-installation`); files no
-- record refers to are removed at start-up only when the two match, so a server started against
-- the wrong database (a fresh or a staging one) never takes a data directory's files for orphans.
create table installation (
    id          uuid primary key,
    created_at  timestamptz not null default now()
);
insert into installation (id) values (gen_random_uuid());
