-- DICOM: each tenant's key for the keyed replacements of patient IDs and UIDs (made on first
-- use, never shown), and what each DICOM video was and what its de-identification did.

alter table tenants add column deid_key bytea;
alter table videos add column dicom jsonb;
-- A dataset's DICOM options: {"label_attribute": keyword or tag}.
alter table datasets add column dicom jsonb not null default '{}'::jsonb;
-- Whether a dataset deletes each video's source once its training cache is written.
alter table datasets add column discard_sources boolean not null default false;
-- DICOMweb imports are uploads too (fetched from the configured PACS).
alter table uploads drop constraint uploads_kind_check;
alter table uploads add constraint uploads_kind_check check (kind in ('archive', 'video', 'import'));
