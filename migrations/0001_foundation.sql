-- Foundation: tenants, API keys and the append-only audit trail.

create or replace function set_updated_at() returns trigger as $$
begin
    new.updated_at = now();
    return new;
end;
$$ language plpgsql;

create table tenants (
    id          uuid primary key,
    name        text not null unique check (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);
create trigger tenants_updated_at before update on tenants
    for each row execute function set_updated_at();

-- Only a SHA-256 digest of each key is stored, plus a short prefix that lets people tell keys apart.
create table api_keys (
    id          uuid primary key,
    tenant_id   uuid not null references tenants (id),
    name        text not null default '',
    prefix      text not null,
    digest      bytea not null unique check (length(digest) = 32),
    admin       boolean not null default false,
    created_at  timestamptz not null default now(),
    last_used_at timestamptz,
    revoked_at  timestamptz
);
create index api_keys_tenant on api_keys (tenant_id);

-- Every /v1 request. Holds no request bodies and no file names: nothing that could carry patient data.
create table audit_events (
    id           bigserial primary key,
    at           timestamptz not null default now(),
    tenant_id    uuid,
    key_id       uuid,
    action       text not null,
    resource_id  uuid,
    status       smallint not null,
    request_id   text not null,
    client_addr  text,
    details      jsonb not null default '{}'::jsonb
);
create index audit_events_tenant_at on audit_events (tenant_id, at desc);

create or replace function audit_events_append_only() returns trigger as $$
begin
    raise exception 'audit_events is append-only (% refused)', tg_op
        using errcode = 'insufficient_privilege';
end;
$$ language plpgsql;
create trigger audit_events_no_update before update or delete on audit_events
    for each row execute function audit_events_append_only();
create trigger audit_events_no_truncate before truncate on audit_events
    for each statement execute function audit_events_append_only();
