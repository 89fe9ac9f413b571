-- Storage quotas: a per-tenant limit (null: the server's default) and the byte counts that
-- usage is summed from. Uploads count at their received size and caches from their
-- dimensions (raw RGB frames); checkpoints and models record what they wrote.

alter table tenants add column storage_quota_bytes bigint check (storage_quota_bytes >= 0);
alter table jobs add column checkpoint_bytes bigint not null default 0 check (checkpoint_bytes >= 0);
alter table models add column bytes bigint not null default 0 check (bytes >= 0);
alter table custom_backbones add column bytes bigint not null default 0 check (bytes >= 0);
