-- Datasets, their uploads and videos.

create table datasets (
    id            uuid primary key,
    tenant_id     uuid not null references tenants (id),
    name          text not null,
    description   text not null default '',
    -- uploading: waiting for (or receiving) data; processing: ingest running; ready; failed.
    status        text not null default 'uploading'
                  check (status in ('uploading', 'processing', 'ready', 'failed')),
    status_reason text,
    -- True while an upload body is being received (one at a time per dataset).
    receiving     boolean not null default false,
    -- Declared class names; when set, labels outside it are rejected.
    classes       text[],
    -- {"train": .7, "val": .15, "test": .15, "seed": 0}
    split         jsonb not null,
    -- {"short_side": 128, "fps": 15}
    cache_spec    jsonb not null,
    videos_total  integer not null default 0,
    videos_done   integer not null default 0,
    -- SHA-256 over the accepted videos' (sha256, label, split), sorted: identifies the content.
    content_hash  text,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    unique (tenant_id, name)
);
create index datasets_tenant on datasets (tenant_id, created_at desc);
create trigger datasets_updated_at before update on datasets
    for each row execute function set_updated_at();

create table uploads (
    id          uuid primary key,
    dataset_id  uuid not null references datasets (id) on delete cascade,
    tenant_id   uuid not null references tenants (id),
    kind        text not null check (kind in ('archive', 'video')),
    bytes       bigint not null,
    sha256      text not null,
    status      text not null default 'received'
                check (status in ('received', 'done', 'failed')),
    reason      text,
    -- For single-video uploads: the label, split and patient given with it.
    meta        jsonb not null default '{}'::jsonb,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);
create index uploads_dataset on uploads (dataset_id);
create trigger uploads_updated_at before update on uploads
    for each row execute function set_updated_at();

create table videos (
    id            uuid primary key,
    dataset_id    uuid not null references datasets (id) on delete cascade,
    tenant_id     uuid not null references tenants (id),
    upload_id     uuid not null references uploads (id) on delete cascade,
    -- Path inside the upload. Shown to the tenant; never logged or audited.
    path          text not null,
    status        text not null default 'pending'
                  check (status in ('pending', 'accepted', 'rejected', 'skipped')),
    reason_code   text,
    reason        text,
    label         text,
    split         text check (split in ('train', 'val', 'test')),
    split_given   boolean not null default false,
    patient_id    text,
    sha256        text,
    bytes         bigint,
    container     text,
    codec         text,
    width         integer,
    height        integer,
    fps           double precision,
    duration_s    double precision,
    frames        bigint,
    cache_frames  integer,
    cache_width   integer,
    cache_height  integer,
    cache_fps     double precision,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    unique (upload_id, path)
);
create index videos_dataset on videos (dataset_id, status);
create trigger videos_updated_at before update on videos
    for each row execute function set_updated_at();
