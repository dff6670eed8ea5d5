-- supabase-aliyun-sms 1/6: schema, roles and tables.
--
-- Schema `sms` is private (never list it in PGRST_DB_SCHEMAS). It holds the verification codes
-- (hashed), the outbox the sidecar drains, the delivery ledger, the limit locks and the one-row
-- policy table. supabase-js reaches it only through the thin `security invoker` wrappers in
-- public (20261205000003_codes.sql). Every file runs unchanged under `supabase db push`,
-- `sms-sidecar migrate`, psql or the Studio SQL editor, as the `postgres` role, and again without
-- harm.
--
-- The files are cut by concern: 1 schema (this file), 2 callers and limits, 3 codes and the public
-- API, 4 delivery (the outbox the sidecar drains), 5 the Auth hook, 6 what the operator runs.
-- They replaced the pre-release files 20261121000001 to 20261204000004: a database that applied
-- those must be re-created (`sms-sidecar migrate` says so and applies nothing).
--
-- Conventions of every file: internal helpers carry a leading underscore and are granted to
-- nobody; every function pins search_path = pg_catalog, pg_temp (an empty search_path still
-- resolves type names from pg_temp first, where a caller can plant a domain whose check runs as
-- owner) and names everything schema-qualified; each grant stands under the function it governs.

create schema if not exists sms;
comment on schema sms is 'supabase-aliyun-sms: verification codes, SMS outbox and delivery ledger. Private: do not expose through PostgREST.';
revoke all on schema sms from public;

-- PostgreSQL grants EXECUTE on new functions to PUBLIC, and a default privilege per schema cannot
-- take that back: every file that creates functions ends by revoking it, so nothing in this schema
-- is callable by anyone who was not granted it beside the function.

------------------------------------------------------------------------------------------------
-- Roles: each gets exactly what its process calls (see the grants beside the functions)
------------------------------------------------------------------------------------------------

do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'sms_sidecar') then
        create role sms_sidecar nologin noinherit;
    end if;
    if not exists (select from pg_catalog.pg_roles where rolname = 'sms_grpc') then
        create role sms_grpc nologin noinherit;
    end if;
end
$$;
comment on role sms_sidecar is 'supabase-aliyun-sms sidecar: claims and completes outbox messages. No login until an operator runs: alter role sms_sidecar with login password ''...''';
comment on role sms_grpc is 'supabase-aliyun-sms: the gRPC drop-in (sms-sidecar grpc, or GRPC_PORT in serve), which sets this role on its connections. Grant it to the login that runs gRPC: grant sms_grpc to sms_sidecar;';
-- Lets the owner act as either (set role) to check what it can do.
grant sms_sidecar to postgres;
grant sms_grpc to postgres;

-- The public wrappers run as the caller, so API callers need the schema too; anon gets it only
-- while sms.settings.allow_anon is on (sms._sync_anon_grants).
grant usage on schema sms to authenticated, service_role, sms_sidecar, sms_grpc, supabase_auth_admin;

------------------------------------------------------------------------------------------------
-- Policy
------------------------------------------------------------------------------------------------

create table if not exists sms.settings (
    id boolean primary key default true check (id),
    code_ttl_seconds integer not null default 300 check (code_ttl_seconds between 30 and 86400),
    code_length integer not null default 6 check (code_length between 4 and 6),
    max_attempts integer not null default 3 check (max_attempts between 1 and 100),
    resend_cooldown_seconds integer default 60 check (resend_cooldown_seconds >= 0),
    daily_limit_per_phone integer default 10 check (daily_limit_per_phone >= 1),
    hourly_limit_per_user integer default 10 check (hourly_limit_per_user >= 1),
    hourly_limit_per_ip integer default 30 check (hourly_limit_per_ip >= 1),
    allowed_country_codes text[] not null default '{86}' check (
        cardinality(allowed_country_codes) = 0
        or array_to_string(allowed_country_codes, ',') ~ '^[1-9][0-9]{0,2}(,[1-9][0-9]{0,2})*$'
    ),
    allow_anon boolean not null default false,
    test_codes jsonb not null default '{}' check (jsonb_typeof(test_codes) = 'object'),
    updated_at timestamptz not null default now(),
    hourly_limit_per_phone integer default 5 check (hourly_limit_per_phone >= 1),
    others_hourly_limit_per_phone integer default 2 check (others_hourly_limit_per_phone >= 0),
    others_daily_limit_per_phone integer default 3 check (others_daily_limit_per_phone >= 0),
    allow_anonymous_users boolean not null default true
);
comment on table sms.settings is 'supabase-aliyun-sms policy, one row. A NULL limit disables that limit. test_codes maps E.164 digits (no +) to a fixed code; such numbers are never texted.';
comment on column sms.settings.hourly_limit_per_phone is 'Sends per phone per hour, whoever asks (Aliyun''s own default is 5 per number and sign). NULL disables.';
comment on column sms.settings.others_hourly_limit_per_phone is 'Of the phone''s sends in an hour, how many may be asked for by callers who do not own the number (another user, an anonymous caller); the rest stays the owner''s. NULL disables.';
comment on column sms.settings.others_daily_limit_per_phone is 'The same as others_hourly_limit_per_phone over 24 hours. NULL disables.';
comment on column sms.settings.allow_anonymous_users is 'Whether Supabase anonymous sign-ins (JWT is_anonymous) may request codes. They are counted per address only: every anonymous sign-in is a fresh user.';
insert into sms.settings default values on conflict do nothing;

create table if not exists sms.secrets (
    id boolean primary key default true check (id),
    code_hmac_key bytea not null default extensions.gen_random_bytes(32),
    created_at timestamptz not null default now()
);
comment on table sms.secrets is 'supabase-aliyun-sms: the key codes are HMACed with. Never grant it to anyone.';
insert into sms.secrets default values on conflict do nothing;

create table if not exists sms.templates (
    purpose text primary key check (purpose ~ '^[a-z0-9][a-z0-9_.-]{0,31}$'),
    sign_name text not null check (length(sign_name) between 1 and 64),
    template_code text not null check (template_code ~ '^[A-Za-z0-9_]{1,64}$'),
    updated_at timestamptz not null default now()
);
comment on table sms.templates is 'supabase-aliyun-sms: per-purpose Aliyun sign name and template for mainland numbers, overriding ALIYUN_SMS_SIGN_NAME/ALIYUN_SMS_TEMPLATE_CODE. Purpose mfa is used for GoTrue MFA events.';

------------------------------------------------------------------------------------------------
-- Codes
------------------------------------------------------------------------------------------------

create table if not exists sms.codes (
    id uuid primary key default gen_random_uuid(),
    phone text not null,
    purpose text not null,
    user_id uuid,
    code_hash bytea not null,
    attempts integer not null default 0,
    is_test boolean not null default false,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    consumed_at timestamptz,
    invalidated_at timestamptz,
    invalidated_reason text check (invalidated_reason in ('superseded', 'too_many_attempts')),
    owner text not null,
    check ((invalidated_at is null) = (invalidated_reason is null))
);
comment on table sms.codes is 'supabase-aliyun-sms verification codes, HMAC-SHA256 only (keyed by sms.secrets, salted by id). At most one outstanding code per phone, purpose and owner.';
comment on column sms.codes.owner is 'Who may verify the code, and whose codes a new one supersedes: user:<uuid>, service (service_role or a direct connection), grpc, or anon:<address>.';
-- "A new code supersedes the owner's older ones", enforced by the schema and not only by the functions.
create unique index if not exists codes_one_outstanding_per_owner_idx on sms.codes (phone, purpose, owner)
    where consumed_at is null and invalidated_at is null;
create index if not exists codes_phone_purpose_owner_created_idx on sms.codes (phone, purpose, owner, created_at desc);
create index if not exists codes_expires_idx on sms.codes (expires_at);

------------------------------------------------------------------------------------------------
-- Outbox and delivery ledger
------------------------------------------------------------------------------------------------

create table if not exists sms.outbox (
    id uuid primary key default gen_random_uuid(),
    code_id uuid references sms.codes (id) on delete set null,
    source text not null check (source in ('rpc', 'auth_hook', 'pg_hook', 'grpc')),
    phone text not null,
    purpose text not null,
    user_id uuid,
    client_ip inet,
    code text,
    status text not null default 'queued' check (status in ('queued', 'sending', 'sent', 'failed')),
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    lease_until timestamptz,
    locked_by text,
    expires_at timestamptz not null,
    dedup_key text unique,
    sign_name text,
    template_code text,
    provider_code text,
    last_error text,
    biz_id text,
    created_at timestamptz not null default now(),
    sent_at timestamptz,
    gotrue_shape text,
    requester text,
    by_owner boolean not null default true,
    ip_key text,
    -- The plain code exists only while the message can still be delivered.
    constraint outbox_code_only_while_pending check (status in ('queued', 'sending') or code is null)
);
comment on table sms.outbox is 'supabase-aliyun-sms: every SMS requested (verification codes and GoTrue OTPs). The sidecar claims rows with a lease; rows also drive the per-phone/user/IP limits.';
comment on column sms.outbox.gotrue_shape is 'Payload shape of the GoTrue event (flat, user+sms, +sms.phone, +metadata), which tells the GoTrue version.';
comment on column sms.outbox.requester is 'Who asked for this SMS (user:<uuid>, service, grpc, auth, anon:<address>); the resend cooldown is per phone and requester.';
comment on column sms.outbox.by_owner is 'False when the requester does not own the number: such sends share the phone''s others_* budget.';
comment on column sms.outbox.ip_key is 'The client address as the per-IP limit counts it (IPv4 host, IPv6 /64, or invalid/unknown).';
-- One message per code. Partial: hook messages have no code row, and every status change of a row
-- rewrites each index it is in (no HOT update), so they skip this one.
create unique index if not exists outbox_code_id_idx on sms.outbox (code_id) where code_id is not null;
create index if not exists outbox_queued_idx on sms.outbox (next_attempt_at) where status = 'queued';
create index if not exists outbox_sending_idx on sms.outbox (lease_until) where status = 'sending';
-- The per-phone limits and the cooldown (phone and requester) read the few rows of one phone here:
-- the cooldown has no index of its own, since every status change of a row rewrites all of them
-- (no HOT update).
create index if not exists outbox_phone_created_idx on sms.outbox (phone, created_at desc);
create index if not exists outbox_user_created_idx on sms.outbox (user_id, created_at desc) where user_id is not null;
create index if not exists outbox_ip_key_created_idx on sms.outbox (ip_key, created_at desc) where ip_key is not null;
create index if not exists outbox_created_idx on sms.outbox (created_at);
-- The claim's expiry sweep and queue_stats look only at pending rows, among millions kept for the limits.
create index if not exists outbox_pending_expires_idx on sms.outbox (expires_at) where status in ('queued', 'sending');

create table if not exists sms.deliveries (
    id bigint generated always as identity primary key,
    message_id uuid not null references sms.outbox (id) on delete cascade,
    attempt integer not null,
    worker text not null,
    provider text,
    started_at timestamptz not null default clock_timestamp(),
    finished_at timestamptz,
    outcome text check (outcome in ('accepted', 'rejected', 'retry', 'ambiguous', 'released')),
    provider_code text,
    provider_message text,
    biz_id text,
    provider_request_id text,
    latency_ms integer,
    check ((finished_at is null) = (outcome is null))
);
comment on table sms.deliveries is 'supabase-aliyun-sms delivery ledger: one row per send attempt, with the provider''s result code, BizId, request id and latency. Its id is sent to Aliyun as OutId.';
create index if not exists deliveries_message_idx on sms.deliveries (message_id);

------------------------------------------------------------------------------------------------
-- Limit locks
------------------------------------------------------------------------------------------------

create table if not exists sms.limit_locks (
    key text primary key,
    touched_at timestamptz not null default now()
);
comment on table sms.limit_locks is 'supabase-aliyun-sms: one row per phone, user and address that asked for an SMS. Requests update their rows before counting, which serialises them and makes a concurrent send a serialization failure under REPEATABLE READ and SERIALIZABLE.';

------------------------------------------------------------------------------------------------
-- Row-level security on every table, and no table for anyone but the owner
------------------------------------------------------------------------------------------------

alter table sms.settings enable row level security;
alter table sms.secrets enable row level security;
alter table sms.templates enable row level security;
alter table sms.codes enable row level security;
alter table sms.outbox enable row level security;
alter table sms.deliveries enable row level security;
alter table sms.limit_locks enable row level security;

revoke all on all tables in schema sms from public, anon, authenticated, service_role;
revoke all on all sequences in schema sms from public, anon, authenticated, service_role;
