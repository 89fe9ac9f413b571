-- Operator keys: the role for what every tenant shares (tenants, pretrained weights, TorchScript
-- backbones, /metrics). Admin keys keep administering their own tenant only. An operator key is
-- made only on the host (`vidtune keys create --operator`), never over HTTP.

alter table api_keys add column operator boolean not null default false;

-- An operator is also an admin of its own tenant; the database keeps the two flags consistent so
-- no code path has to decide what an operator that is not an admin would mean.
alter table api_keys add constraint api_keys_operator_is_admin check (admin or not operator);
