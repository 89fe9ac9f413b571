-- Pretrained weights for the built-in architectures (installed by admins, shared by all tenants)
-- and tenant-owned TorchScript backbones.

create table base_weights (
    id          uuid primary key,
    arch        text not null,
    -- SHA-256 of the file as imported (the official file names carry its first hex digits).
    sha256      text not null,
    source      text not null,
    -- Canonical safetensors copy of the backbone tensors, relative to the data directory.
    path        text not null,
    tensors     integer not null,
    created_at  timestamptz not null default now(),
    unique (arch, sha256)
);
create index base_weights_arch on base_weights (arch, created_at desc);

create table custom_backbones (
    id             uuid primary key,
    tenant_id      uuid not null references tenants (id),
    name           text not null,
    description    text not null default '',
    feature_dim    integer not null,
    preprocessing  jsonb not null,
    sha256         text not null,
    -- TorchScript module, relative to the data directory.
    path           text not null,
    created_at     timestamptz not null default now(),
    unique (tenant_id, name)
);
