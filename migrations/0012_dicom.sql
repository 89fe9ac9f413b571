-- DICOM: each tenant's key for the keyed replacements of patient IDs and UIDs (made on first
-- use, never shown), and what each DICOM video was and what its de-identification did.

alter table tenants add column deid_key bytea;
alter table videos add column dicom jsonb;
