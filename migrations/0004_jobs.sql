-- Fine-tuning jobs (the queue), their metric history and events, and the resulting models.

create table jobs (
    id                uuid primary key,
    tenant_id         uuid not null references tenants (id),
    dataset_id        uuid not null references datasets (id),
    base_model        text not null,
    hyperparameters   jsonb not null,
    -- queued → running → succeeded | failed | canceled
    state             text not null default 'queued'
                      check (state in ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    cancel_requested  boolean not null default false,
    priority          integer not null default 0,
    -- 'auto', 'cpu' or 'cuda': which workers may claim it.
    device_pref       text not null default 'auto',
    -- The fencing token: bumped by every claim; every write of an attempt names it.
    attempt           integer not null default 0,
    max_attempts      integer not null default 3,
    run_after         timestamptz not null default now(),
    worker_id         text,
    device            text,
    lease_expires_at  timestamptz,
    epoch             integer not null default 0,
    epochs            integer not null,
    step              bigint not null default 0,
    progress          double precision not null default 0,
    eta_s             double precision,
    checkpoint        text,
    error_kind        text check (error_kind in ('user', 'system')),
    error             text,
    idempotency_key   text,
    request_hash      text,
    model_id          uuid,
    created_at        timestamptz not null default now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz not null default now(),
    unique (tenant_id, idempotency_key)
);
create index jobs_claim on jobs (priority desc, created_at) where state = 'queued';
create index jobs_tenant on jobs (tenant_id, created_at desc);
create trigger jobs_updated_at before update on jobs
    for each row execute function set_updated_at();

-- Wake workers when a job becomes claimable.
create or replace function jobs_notify() returns trigger as $$
begin
    if new.state = 'queued' then
        perform pg_notify('vidtune_jobs', new.id::text);
    end if;
    return new;
end;
$$ language plpgsql;
create trigger jobs_notify after insert or update of state on jobs
    for each row execute function jobs_notify();

create table job_epochs (
    job_id           uuid not null references jobs (id) on delete cascade,
    epoch            integer not null,
    attempt          integer not null,
    train_loss       double precision not null,
    train_accuracy   double precision not null,
    val              jsonb not null,
    lr               double precision not null,
    clips_per_s      double precision not null,
    data_wait_share  double precision not null,
    created_at       timestamptz not null default now(),
    primary key (job_id, epoch)
);

create table job_steps (
    job_id      uuid not null references jobs (id) on delete cascade,
    step        bigint not null,
    epoch       integer not null,
    attempt     integer not null,
    loss        double precision not null,
    lr          double precision not null,
    created_at  timestamptz not null default now(),
    primary key (job_id, step)
);

create table job_events (
    id          bigserial primary key,
    job_id      uuid not null references jobs (id) on delete cascade,
    at          timestamptz not null default now(),
    attempt     integer not null,
    kind        text not null,
    level       text not null default 'info',
    message     text not null,
    data        jsonb not null default '{}'::jsonb
);
create index job_events_job on job_events (job_id, id);

create or replace function job_events_notify() returns trigger as $$
begin
    perform pg_notify('vidtune_job_events', new.job_id::text);
    return new;
end;
$$ language plpgsql;
create trigger job_events_notify after insert on job_events
    for each row execute function job_events_notify();

create table models (
    id                   uuid primary key,
    tenant_id            uuid not null references tenants (id),
    job_id               uuid not null unique references jobs (id),
    dataset_id           uuid not null,
    dataset_hash         text,
    base_model           text not null,
    base_weights_sha256  text,
    hyperparameters      jsonb not null,
    classes              text[] not null,
    preprocessing        jsonb not null,
    -- How videos are decoded before preprocessing (the training dataset's cache: fps, short side).
    decode               jsonb not null,
    head                 jsonb not null,
    eval_clips           integer not null,
    val_metrics          jsonb not null,
    test_metrics         jsonb,
    vidtune_version      text not null,
    libtorch_version     text not null,
    path                 text not null,
    created_at           timestamptz not null default now()
);
create index models_tenant on models (tenant_id, created_at desc);
