-- supabase-aliyun-sms: the Postgres core.
--
-- Schema `sms` is private (never list it in PGRST_DB_SCHEMAS). It holds the verification codes
-- (hashed), the outbox the sidecar drains, the delivery ledger and the one-row policy table.
-- supabase-js reaches it only through the thin `security invoker` wrappers at the end of this file.
-- Runs unchanged under `supabase db push`, `sms-sidecar migrate`, psql or the Studio SQL editor,
-- as the `postgres` role.

create schema if not exists sms;
comment on schema sms is 'supabase-aliyun-sms: verification codes, SMS outbox and delivery ledger. Private: do not expose through PostgREST.';
revoke all on schema sms from public;

-- PostgreSQL grants EXECUTE on new functions to PUBLIC; nothing in this schema should be callable
-- by anyone who was not granted it below.
alter default privileges in schema sms revoke execute on functions from public;

do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'sms_sidecar') then
        create role sms_sidecar nologin noinherit;
    end if;
end
$$;
-- Lets the owner act as the sidecar (set role) to check what it can do.
grant sms_sidecar to postgres;
comment on role sms_sidecar is 'supabase-aliyun-sms sidecar: claims and completes outbox messages. No login until an operator runs: alter role sms_sidecar with login password ''...''';

------------------------------------------------------------------------------------------------
-- Tables
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
    updated_at timestamptz not null default now()
);
comment on table sms.settings is 'supabase-aliyun-sms policy, one row. A NULL limit disables that limit. test_codes maps E.164 digits (no +) to a fixed code; such numbers are never texted.';
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
    check ((invalidated_at is null) = (invalidated_reason is null))
);
comment on table sms.codes is 'supabase-aliyun-sms verification codes, HMAC-SHA256 only (keyed by sms.secrets, salted by id). At most one outstanding code per phone and purpose.';
create index if not exists codes_phone_purpose_created_idx on sms.codes (phone, purpose, created_at desc);
-- "A new code invalidates older ones", enforced by the schema and not only by the functions.
create unique index if not exists codes_one_outstanding_idx on sms.codes (phone, purpose)
    where consumed_at is null and invalidated_at is null;
create index if not exists codes_expires_idx on sms.codes (expires_at);

create table if not exists sms.outbox (
    id uuid primary key default gen_random_uuid(),
    code_id uuid unique references sms.codes (id) on delete set null,
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
    -- The plain code exists only while the message can still be delivered.
    constraint outbox_code_only_while_pending check (status in ('queued', 'sending') or code is null)
);
comment on table sms.outbox is 'supabase-aliyun-sms: every SMS requested (verification codes and GoTrue OTPs). The sidecar claims rows with a lease; rows also drive the per-phone/user/IP limits.';
create index if not exists outbox_queued_idx on sms.outbox (next_attempt_at) where status = 'queued';
create index if not exists outbox_sending_idx on sms.outbox (lease_until) where status = 'sending';
create index if not exists outbox_phone_created_idx on sms.outbox (phone, created_at desc);
create index if not exists outbox_user_created_idx on sms.outbox (user_id, created_at desc) where user_id is not null;
create index if not exists outbox_ip_created_idx on sms.outbox (client_ip, created_at desc) where client_ip is not null;
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

alter table sms.settings enable row level security;
alter table sms.secrets enable row level security;
alter table sms.templates enable row level security;
alter table sms.codes enable row level security;
alter table sms.outbox enable row level security;
alter table sms.deliveries enable row level security;

revoke all on all tables in schema sms from public, anon, authenticated, service_role;
revoke all on all sequences in schema sms from public, anon, authenticated, service_role;

------------------------------------------------------------------------------------------------
-- Helpers
------------------------------------------------------------------------------------------------

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261121000001'::text $$;
comment on function sms.schema_version() is 'supabase-aliyun-sms: version of the newest migration applied; /readyz compares it with the sidecar''s own.';

create or replace function sms.current_settings()
returns sms.settings
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings;
begin
    select * into s from sms.settings where id;
    if not found then
        raise exception 'sms.settings has no row' using hint = 'insert into sms.settings default values';
    end if;
    return s;
end
$$;
comment on function sms.current_settings() is 'supabase-aliyun-sms: the policy row; fails clearly if it was deleted.';

create or replace function sms.raise_api_error(
    p_status integer,
    p_code text,
    p_message text,
    p_details jsonb default null,
    p_retry_after integer default null
)
returns void
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    -- PostgREST turns SQLSTATE PGRST into exactly this status, body and headers; other callers
    -- get an exception they cannot mistake for success.
    raise sqlstate 'PGRST' using
        message = pg_catalog.json_build_object(
            'code', p_code, 'message', p_message, 'details', p_details::text, 'hint', null
        )::text,
        detail = pg_catalog.json_build_object(
            'status', p_status,
            'headers', case when p_retry_after is null then '{}'::json
                            else pg_catalog.json_build_object('Retry-After', p_retry_after::text) end
        )::text;
end
$$;
comment on function sms.raise_api_error(integer, text, text, jsonb, integer) is 'supabase-aliyun-sms: raise an error PostgREST answers with the given HTTP status, JSON body and Retry-After.';

create or replace function sms.request_claims()
returns jsonb
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}'::jsonb);
end
$$;
comment on function sms.request_claims() is 'supabase-aliyun-sms: the JWT claims PostgREST set for this request, or {}.';

create or replace function sms.caller_uid()
returns uuid
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    sub text := sms.request_claims() ->> 'sub';
begin
    if sub ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
        return sub::uuid;
    end if;
    return null;
end
$$;
comment on function sms.caller_uid() is 'supabase-aliyun-sms: the signed-in user (JWT sub), or NULL. Reads the claims directly so it works before GoTrue has replaced auth.uid().';

create or replace function sms.caller_role()
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce(sms.request_claims() ->> 'role', '');
end
$$;
comment on function sms.caller_role() is 'supabase-aliyun-sms: the JWT role of the request (anon, authenticated, service_role), or empty.';

create or replace function sms.client_ip()
returns inet
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    h jsonb;
    forwarded text[];
    candidate text;
begin
    h := nullif(pg_catalog.current_setting('request.headers', true), '')::jsonb;
    if h is null then
        return null;
    end if;
    -- Kong overwrites X-Real-IP with the peer it saw; the right-most X-Forwarded-For entry is the
    -- one the nearest proxy appended. Entries further left are whatever the client sent.
    candidate := nullif(btrim(h ->> 'x-real-ip'), '');
    if candidate is null and h ? 'x-forwarded-for' then
        forwarded := regexp_split_to_array(h ->> 'x-forwarded-for', '\s*,\s*');
        candidate := nullif(btrim(forwarded[cardinality(forwarded)]), '');
    end if;
    return candidate::inet;
exception
    when others then
        return null;
end
$$;
comment on function sms.client_ip() is 'supabase-aliyun-sms: client address from PostgREST request.headers (X-Real-IP, else the last X-Forwarded-For entry), or NULL.';

create or replace function sms.normalize_phone(p_raw text)
returns text
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    d text;
begin
    if p_raw is null or length(p_raw) > 32 then
        return null;
    end if;
    d := regexp_replace(btrim(p_raw), '[[:space:]()-]', '', 'g');
    if d ~ '^\+[0-9]+$' then
        d := substr(d, 2);
    elsif d ~ '^00[0-9]+$' then
        d := substr(d, 3);
    elsif d ~ '^1[3-9][0-9]{9}$' then
        -- A bare 11-digit mobile number is mainland China's, as Aliyun reads it too.
        d := '86' || d;
    elsif d !~ '^[0-9]+$' then
        return null;
    end if;
    if d !~ '^[1-9][0-9]{7,14}$' then
        return null;
    end if;
    if d like '86%' and substr(d, 3) !~ '^1[3-9][0-9]{9}$' then
        return null;
    end if;
    return d;
end
$$;
comment on function sms.normalize_phone(text) is 'supabase-aliyun-sms: +8613012341234, 8613012341234, 008613012341234 or 13012341234 to E.164 digits without + (8613012341234); NULL when not a valid number.';

create or replace function sms.country_allowed(p_phone text, p_codes text[])
returns boolean
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    cc text;
begin
    foreach cc in array p_codes loop
        if starts_with(p_phone, cc) then
            return true;
        end if;
    end loop;
    return false;
end
$$;
comment on function sms.country_allowed(text, text[]) is 'supabase-aliyun-sms: whether a normalised number belongs to one of the allowed country codes.';

create or replace function sms.valid_purpose(p_purpose text)
returns boolean
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce(p_purpose ~ '^[a-z0-9][a-z0-9_.-]{0,31}$', false);
end
$$;
comment on function sms.valid_purpose(text) is 'supabase-aliyun-sms: purposes are short lowercase identifiers such as default, bind_phone or mfa.';

create or replace function sms.random_code(p_length integer)
returns text
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    modulus bigint := (10::bigint ^ p_length)::bigint;
    bound bigint := (4294967296 / modulus) * modulus;
    b bytea;
    v bigint;
begin
    -- Rejection sampling from a CSPRNG keeps every code equally likely.
    loop
        b := extensions.gen_random_bytes(4);
        v := (get_byte(b, 0)::bigint << 24) | (get_byte(b, 1)::bigint << 16)
             | (get_byte(b, 2)::bigint << 8) | get_byte(b, 3)::bigint;
        if v < bound then
            return lpad((v % modulus)::text, p_length, '0');
        end if;
    end loop;
end
$$;
comment on function sms.random_code(integer) is 'supabase-aliyun-sms: uniformly random digits from pgcrypto''s CSPRNG.';

create or replace function sms.code_hash(p_id uuid, p_code text)
returns bytea
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    h bytea;
begin
    select extensions.hmac(convert_to(p_id::text || ':' || p_code, 'UTF8'), s.code_hmac_key, 'sha256')
    into h
    from sms.secrets as s
    where s.id;
    return h;
end
$$;
comment on function sms.code_hash(uuid, text) is 'supabase-aliyun-sms: HMAC-SHA256 of a code, keyed by sms.secrets and salted with the code''s id.';

create or replace function sms.constant_time_equal(a bytea, b bytea)
returns boolean
language plpgsql
immutable
strict
set search_path = pg_catalog, pg_temp
as $$
declare
    diff integer := length(a) # length(b);
begin
    for i in 0 .. least(length(a), length(b)) - 1 loop
        diff := diff | (get_byte(a, i) # get_byte(b, i));
    end loop;
    return diff = 0;
end
$$;
comment on function sms.constant_time_equal(bytea, bytea) is 'supabase-aliyun-sms: compares every byte, so the time taken does not depend on where the inputs differ.';

create or replace function sms.enforce_send_limits(p_phone text, p_user_id uuid, p_ip inet)
returns void
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    t timestamptz;
    wait_until timestamptz;
    hit text[] := '{}';
    seconds integer;
begin
    -- Serialise concurrent requests for the same phone, user and address (always in this order,
    -- so two requests can never wait on each other) so limits cannot be raced past.
    perform pg_catalog.pg_advisory_xact_lock(hashtextextended('sms.phone:' || p_phone, 0));
    if p_user_id is not null then
        perform pg_catalog.pg_advisory_xact_lock(hashtextextended('sms.user:' || p_user_id::text, 0));
    end if;
    if p_ip is not null then
        perform pg_catalog.pg_advisory_xact_lock(hashtextextended('sms.ip:' || host(p_ip), 0));
    end if;

    if s.resend_cooldown_seconds is not null then
        select max(o.created_at) into t from sms.outbox as o where o.phone = p_phone;
        if t + make_interval(secs => s.resend_cooldown_seconds) > now() then
            wait_until := t + make_interval(secs => s.resend_cooldown_seconds);
            hit := array_append(hit, 'resend_cooldown');
        end if;
    end if;

    -- For an N-per-window limit, the N-th most recent send in the window decides when a slot frees.
    if s.daily_limit_per_phone is not null then
        select o.created_at into t from sms.outbox as o
        where o.phone = p_phone and o.created_at > now() - interval '24 hours'
        order by o.created_at desc offset s.daily_limit_per_phone - 1 limit 1;
        if found then
            wait_until := greatest(wait_until, t + interval '24 hours');
            hit := array_append(hit, 'daily_limit_per_phone');
        end if;
    end if;

    if p_user_id is not null and s.hourly_limit_per_user is not null then
        select o.created_at into t from sms.outbox as o
        where o.user_id = p_user_id and o.created_at > now() - interval '1 hour'
        order by o.created_at desc offset s.hourly_limit_per_user - 1 limit 1;
        if found then
            wait_until := greatest(wait_until, t + interval '1 hour');
            hit := array_append(hit, 'hourly_limit_per_user');
        end if;
    end if;

    if p_ip is not null and s.hourly_limit_per_ip is not null then
        select o.created_at into t from sms.outbox as o
        where o.client_ip = p_ip and o.created_at > now() - interval '1 hour'
        order by o.created_at desc offset s.hourly_limit_per_ip - 1 limit 1;
        if found then
            wait_until := greatest(wait_until, t + interval '1 hour');
            hit := array_append(hit, 'hourly_limit_per_ip');
        end if;
    end if;

    if wait_until is not null then
        seconds := greatest(1, ceil(extract(epoch from wait_until - now())))::integer;
        perform sms.raise_api_error(
            429,
            'over_sms_send_rate_limit',
            format('Too many codes requested. Try again in %s seconds. 验证码发送过于频繁，请 %s 秒后再试。', seconds, seconds),
            jsonb_build_object('retry_after', seconds, 'limits', to_jsonb(hit)),
            seconds
        );
    end if;
end
$$;
comment on function sms.enforce_send_limits(text, uuid, inet) is 'supabase-aliyun-sms: raises HTTP 429 (with Retry-After) when sending to this phone, for this user or from this address would break a limit in sms.settings.';

create or replace function sms.check_caller_allowed(s sms.settings)
returns void
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    -- Privileges already keep anon out; this also covers a role granted by hand.
    if not s.allow_anon and sms.caller_uid() is null and sms.caller_role() not in ('service_role', '') then
        perform sms.raise_api_error(401, 'anon_not_allowed', 'Sign in before requesting or verifying a phone code.');
    end if;
end
$$;
comment on function sms.check_caller_allowed(sms.settings) is 'supabase-aliyun-sms: refuses anonymous API callers unless sms.settings.allow_anon is on.';

create or replace function sms.parse_phone(p_phone text, s sms.settings)
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    normalized text := sms.normalize_phone(p_phone);
begin
    if normalized is null then
        perform sms.raise_api_error(
            400, 'invalid_phone',
            'Invalid phone number. Use +86 followed by the 11-digit mobile number. 手机号码格式不正确。'
        );
    end if;
    if not sms.country_allowed(normalized, s.allowed_country_codes) then
        perform sms.raise_api_error(
            400, 'phone_not_allowed',
            'Phone numbers from this country or region are not supported. 不支持该国家或地区的手机号码。'
        );
    end if;
    return normalized;
end
$$;
comment on function sms.parse_phone(text, sms.settings) is 'supabase-aliyun-sms: normalises a phone number or raises HTTP 400 (invalid, or country not allowed).';

create or replace function sms.check_purpose(p_purpose text)
returns void
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if not sms.valid_purpose(p_purpose) then
        perform sms.raise_api_error(
            400, 'invalid_purpose',
            'purpose must be 1-32 characters of a-z, 0-9, _, . or -, starting with a letter or digit.'
        );
    end if;
end
$$;
comment on function sms.check_purpose(text) is 'supabase-aliyun-sms: raises HTTP 400 for a malformed purpose.';

------------------------------------------------------------------------------------------------
-- Verification codes (behind the public wrappers)
------------------------------------------------------------------------------------------------

create or replace function sms.issue_code(
    p_phone text,
    p_purpose text,
    p_user_id uuid,
    p_ip inet,
    p_source text,
    p_sign_name text default null,
    p_template_code text default null
)
returns jsonb
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    v_phone text;
    code_id uuid := gen_random_uuid();
    test_code text;
    code text;
begin
    v_phone := sms.parse_phone(p_phone, s);
    perform sms.check_purpose(p_purpose);
    perform sms.enforce_send_limits(v_phone, p_user_id, p_ip);

    update sms.codes as c
    set invalidated_at = now(), invalidated_reason = 'superseded'
    where c.phone = v_phone and c.purpose = p_purpose
      and c.consumed_at is null and c.invalidated_at is null;

    test_code := s.test_codes ->> v_phone;
    code := coalesce(test_code, sms.random_code(s.code_length));
    insert into sms.codes (id, phone, purpose, user_id, code_hash, is_test, expires_at)
    values (code_id, v_phone, p_purpose, p_user_id, sms.code_hash(code_id, code), test_code is not null,
            now() + make_interval(secs => s.code_ttl_seconds));

    if test_code is null then
        insert into sms.outbox (code_id, source, phone, purpose, user_id, client_ip, code, expires_at,
                                sign_name, template_code)
        values (code_id, p_source, v_phone, p_purpose, p_user_id, p_ip, code,
                now() + make_interval(secs => s.code_ttl_seconds), p_sign_name, p_template_code);
    else
        -- Recorded (so limits and status behave as for a real number) but never sent.
        insert into sms.outbox (code_id, source, phone, purpose, user_id, client_ip, status, expires_at,
                                provider_code, sent_at)
        values (code_id, p_source, v_phone, p_purpose, p_user_id, p_ip, 'sent',
                now() + make_interval(secs => s.code_ttl_seconds), 'TEST_NUMBER', now());
    end if;

    return jsonb_build_object(
        'request_id', code_id,
        'expires_in', s.code_ttl_seconds,
        'retry_after', coalesce(s.resend_cooldown_seconds, 0)
    );
end
$$;
comment on function sms.issue_code(text, text, uuid, inet, text, text, text) is 'supabase-aliyun-sms: issues a code for a phone and purpose, bound to p_user_id, invalidating older ones, and queues its SMS (with an optional sign name and template). Internal: callers go through request_code or grpc_send_code.';

create or replace function sms.request_code(p_phone text, p_purpose text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform sms.check_caller_allowed(sms.current_settings());
    -- A trusted backend calls from its own address; counting that against one IP would lock out everyone.
    return sms.issue_code(
        p_phone, p_purpose, sms.caller_uid(),
        case when sms.caller_role() <> 'service_role' then sms.client_ip() end,
        'rpc'
    );
end
$$;
comment on function sms.request_code(text, text) is 'supabase-aliyun-sms: issues a code for the calling user (JWT sub) and queues its SMS. Behind public.request_phone_code.';

create or replace function sms.check_code(p_phone text, p_code text, p_purpose text, p_user_id uuid)
returns jsonb
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    v_phone text;
    c sms.codes;
    used integer;
begin
    v_phone := sms.parse_phone(p_phone, s);
    perform sms.check_purpose(p_purpose);
    if p_code is null or length(p_code) > 64 then
        perform sms.raise_api_error(400, 'invalid_code', 'code must be a string of at most 64 characters.');
    end if;

    -- The row lock serialises concurrent checks of the same code: one wins, the rest see it used.
    select * into c from sms.codes as x
    where x.phone = v_phone and x.purpose = p_purpose
    order by x.created_at desc
    limit 1
    for update;

    -- Another user's code is reported as absent and not counted: they cannot use it anyway.
    if not found or c.consumed_at is not null or c.user_id is distinct from p_user_id
       or c.invalidated_reason = 'superseded' then
        return jsonb_build_object('valid', false, 'reason', 'not_found', 'attempts_left', 0);
    end if;
    if c.invalidated_reason = 'too_many_attempts' then
        return jsonb_build_object('valid', false, 'reason', 'too_many_attempts', 'attempts_left', 0);
    end if;
    if c.expires_at <= now() then
        return jsonb_build_object('valid', false, 'reason', 'expired', 'attempts_left', 0);
    end if;

    if sms.constant_time_equal(sms.code_hash(c.id, p_code), c.code_hash) then
        update sms.codes set consumed_at = now() where id = c.id;
        return jsonb_build_object('valid', true);
    end if;

    update sms.codes set attempts = attempts + 1 where id = c.id returning attempts into used;
    if used >= s.max_attempts then
        update sms.codes as x
        set invalidated_at = now(), invalidated_reason = 'too_many_attempts'
        where x.phone = v_phone and x.purpose = p_purpose
          and x.consumed_at is null and x.invalidated_at is null;
        return jsonb_build_object('valid', false, 'reason', 'too_many_attempts', 'attempts_left', 0);
    end if;
    return jsonb_build_object('valid', false, 'reason', 'mismatch', 'attempts_left', s.max_attempts - used);
end
$$;
comment on function sms.check_code(text, text, text, uuid) is 'supabase-aliyun-sms: checks a code once for p_user_id, counting failures (returned, never raised, so the count survives PostgREST''s rollback on error). Internal: callers go through verify_code or grpc_verify_code.';

create or replace function sms.verify_code(p_phone text, p_code text, p_purpose text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform sms.check_caller_allowed(sms.current_settings());
    return sms.check_code(p_phone, p_code, p_purpose, sms.caller_uid());
end
$$;
comment on function sms.verify_code(text, text, text) is 'supabase-aliyun-sms: checks a code of the calling user. Behind public.verify_phone_code.';

create or replace function sms.grpc_send_code(p_phone text, p_sign_name text, p_template_code text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    issued jsonb;
begin
    -- The gRPC API names a sign and template per call; only pairs the operator put in sms.templates
    -- may be used (NULLs mean the sidecar's configured defaults), so it cannot text arbitrary templates.
    if (p_sign_name is null) <> (p_template_code is null) or (
        p_sign_name is not null and not exists (
            select from sms.templates as t where t.sign_name = p_sign_name and t.template_code = p_template_code
        )
    ) then
        perform sms.raise_api_error(400, 'template_not_allowed',
                                    'this signature and template pair is not configured in sms.templates');
    end if;
    issued := sms.issue_code(p_phone, 'default', null, null, 'grpc', p_sign_name, p_template_code);
    -- The gRPC call waits for the delivery outcome (sms.message_state), as the original service did.
    return issued || jsonb_build_object(
        'message_id', (select o.id from sms.outbox as o where o.code_id = (issued ->> 'request_id')::uuid)
    );
end
$$;
comment on function sms.grpc_send_code(text, text, text) is 'supabase-aliyun-sms: SendSMS of the phone-number gRPC API: a code of purpose default, bound to no user, with an operator-approved sign name and template.';

create or replace function sms.grpc_verify_code(p_phone text, p_code text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return sms.check_code(p_phone, p_code, 'default', null);
end
$$;
comment on function sms.grpc_verify_code(text, text) is 'supabase-aliyun-sms: Valid of the phone-number gRPC API: checks a code of purpose default bound to no user.';

create or replace function sms.code_status(p_request_id uuid)
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    owner uuid;
    found_status text;
    found_error text;
begin
    perform sms.check_caller_allowed(sms.current_settings());
    select c.user_id, o.status, o.last_error into owner, found_status, found_error
    from sms.codes as c
    join sms.outbox as o on o.code_id = c.id
    where c.id = p_request_id;
    if not found or (owner is distinct from sms.caller_uid() and sms.caller_role() <> 'service_role') then
        perform sms.raise_api_error(404, 'request_not_found', 'No such code request for this caller.');
    end if;
    return jsonb_build_object(
        'status', found_status,
        'error', case when found_status = 'failed' then found_error end
    );
end
$$;
comment on function sms.code_status(uuid) is 'supabase-aliyun-sms: delivery status of the caller''s own code request. Behind public.phone_code_status.';

------------------------------------------------------------------------------------------------
-- Outbox: what the sidecar calls
------------------------------------------------------------------------------------------------

create or replace function sms.notify_outbox()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    -- An empty payload lets Postgres fold a transaction's notifications into one.
    perform pg_catalog.pg_notify('sms_outbox', '');
    return null;
end
$$;
comment on function sms.notify_outbox() is 'supabase-aliyun-sms: wakes LISTENing sidecars when a message is queued.';

drop trigger if exists outbox_notify on sms.outbox;
create trigger outbox_notify
    after insert on sms.outbox
    for each row
    when (new.status = 'queued')
    execute function sms.notify_outbox();

create or replace function sms.claim_messages(p_worker text, p_limit integer, p_lease_seconds integer)
returns table (
    message_id uuid,
    delivery_id bigint,
    attempt integer,
    source text,
    phone text,
    purpose text,
    code text,
    sign_name text,
    template_code text,
    created_at timestamptz,
    needs_reconcile boolean,
    ambiguous_delivery_ids bigint[]
)
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    m record;
begin
    -- A code nobody can use any more is not worth a message. An attempt still open on such a
    -- message belonged to a worker that crashed or hung: it may have reached the provider.
    with expired as (
        update sms.outbox as o
        set status = 'failed', code = null, lease_until = null, provider_code = 'EXPIRED',
            last_error = 'the code expired before it could be delivered'
        where o.id in (
            select x.id from sms.outbox as x
            where x.expires_at <= now()
              and (x.status = 'queued' or (x.status = 'sending' and x.lease_until < now()))
            for update skip locked
        )
        returning o.id
    )
    update sms.deliveries as d
    set finished_at = clock_timestamp(), outcome = 'ambiguous',
        provider_message = 'lease expired before the attempt finished'
    from expired
    where d.message_id = expired.id and d.finished_at is null;

    for m in
        select x.id from sms.outbox as x
        where ((x.status = 'queued' and x.next_attempt_at <= now())
               or (x.status = 'sending' and x.lease_until < now()))
          -- GoTrue gave up on a hook message that failed; its OTP was never stored.
          and x.source <> 'auth_hook'
        order by x.next_attempt_at
        limit p_limit
        for update skip locked
    loop
        -- An attempt still open here belonged to a worker whose lease ran out (it crashed or hung):
        -- it may have reached the provider.
        update sms.deliveries as d
        set finished_at = clock_timestamp(), outcome = 'ambiguous',
            provider_message = 'lease expired before the attempt finished'
        where d.message_id = m.id and d.finished_at is null;

        update sms.outbox as o
        set status = 'sending', attempts = o.attempts + 1, locked_by = p_worker,
            lease_until = now() + make_interval(secs => p_lease_seconds)
        where o.id = m.id
        returning o.id, o.attempts, o.source, o.phone, o.purpose, o.code, o.created_at
        into message_id, attempt, source, phone, purpose, code, created_at;

        insert into sms.deliveries (message_id, attempt, worker)
        values (m.id, attempt, p_worker)
        returning id into delivery_id;

        select coalesce(o.sign_name, t.sign_name), coalesce(o.template_code, t.template_code)
        into sign_name, template_code
        from sms.outbox as o left join sms.templates as t on t.purpose = o.purpose
        where o.id = m.id;

        -- Their ids went to the provider as OutId: the worker looks them up before sending again.
        select coalesce(array_agg(d.id order by d.id), '{}') into ambiguous_delivery_ids
        from sms.deliveries as d where d.message_id = m.id and d.outcome = 'ambiguous';
        needs_reconcile := cardinality(ambiguous_delivery_ids) > 0;
        return next;
    end loop;
end
$$;
comment on function sms.claim_messages(text, integer, integer) is 'supabase-aliyun-sms: leases up to p_limit due messages to a worker (skip locked, so replicas share the queue) and opens a ledger row per attempt. A message whose lease expires becomes claimable again, flagged needs_reconcile.';

create or replace function sms.finish_delivery(
    p_delivery_id bigint,
    p_outcome text,
    p_provider text default null,
    p_provider_code text default null,
    p_provider_message text default null,
    p_biz_id text default null,
    p_provider_request_id text default null,
    p_latency_ms integer default null,
    p_retry_in_seconds integer default 30,
    p_max_attempts integer default 5
)
returns text
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    mid uuid;
    tries integer;
    new_status text;
begin
    if p_outcome not in ('accepted', 'rejected', 'retry', 'ambiguous', 'released') then
        raise exception 'unknown delivery outcome %', p_outcome using errcode = '22023';
    end if;

    update sms.deliveries as d
    set finished_at = clock_timestamp(), outcome = p_outcome, provider = p_provider,
        provider_code = p_provider_code, provider_message = left(p_provider_message, 500),
        biz_id = p_biz_id, provider_request_id = p_provider_request_id, latency_ms = p_latency_ms
    where d.id = p_delivery_id
    returning d.message_id into mid;
    if not found then
        raise exception 'no delivery attempt %', p_delivery_id using errcode = 'P0002';
    end if;

    select o.attempts into tries from sms.outbox as o where o.id = mid for update;

    if p_outcome = 'accepted' then
        -- Recorded even if the lease was lost meanwhile: the provider did accept it.
        update sms.outbox as o
        set status = 'sent', code = null, sent_at = now(), lease_until = null, biz_id = p_biz_id,
            provider_code = p_provider_code, last_error = null
        where o.id = mid;
        new_status := 'sent';
    elsif p_outcome = 'rejected' or (p_outcome in ('retry', 'ambiguous') and tries >= p_max_attempts) then
        update sms.outbox as o
        set status = 'failed', code = null, lease_until = null, provider_code = p_provider_code,
            last_error = left(coalesce(p_provider_message, p_provider_code), 500)
        where o.id = mid;
        new_status := 'failed';
    elsif p_outcome = 'released' then
        -- Never reached the provider (graceful shutdown): give the attempt back.
        update sms.outbox as o
        set status = 'queued', attempts = greatest(o.attempts - 1, 0), lease_until = null, locked_by = null
        where o.id = mid;
        new_status := 'queued';
    else
        update sms.outbox as o
        set status = 'queued', lease_until = null, locked_by = null, provider_code = p_provider_code,
            last_error = left(coalesce(p_provider_message, p_provider_code), 500),
            next_attempt_at = now() + make_interval(secs => greatest(p_retry_in_seconds, 0))
        where o.id = mid;
        new_status := 'queued';
    end if;
    return new_status;
end
$$;
comment on function sms.finish_delivery(bigint, text, text, text, text, text, text, integer, integer, integer) is 'supabase-aliyun-sms: closes a ledger row and moves its message on: accepted -> sent (code erased); rejected, or retry/ambiguous past p_max_attempts -> failed (code erased); retry/ambiguous -> queued again after p_retry_in_seconds; released -> queued, attempt not counted.';

create or replace function sms.release_messages(p_worker text)
returns integer
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    released integer;
begin
    update sms.deliveries as d
    set finished_at = clock_timestamp(), outcome = 'released'
    from sms.outbox as o
    where d.message_id = o.id and d.finished_at is null and o.status = 'sending' and o.locked_by = p_worker;

    update sms.outbox as o
    set status = 'queued', attempts = greatest(o.attempts - 1, 0), lease_until = null, locked_by = null
    where o.status = 'sending' and o.locked_by = p_worker;
    get diagnostics released = row_count;
    return released;
end
$$;
comment on function sms.release_messages(text) is 'supabase-aliyun-sms: on shutdown, hands a worker''s claimed but unsent messages back to the queue.';

create or replace function sms.queue_stats()
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    stats jsonb;
begin
    select jsonb_build_object(
        'queued', count(*) filter (where o.status = 'queued'),
        'sending', count(*) filter (where o.status = 'sending'),
        'oldest_queued_seconds',
            coalesce(extract(epoch from now() - min(o.created_at) filter (where o.status = 'queued')), 0)
    )
    into stats
    from sms.outbox as o
    where o.status in ('queued', 'sending');
    return stats;
end
$$;
comment on function sms.queue_stats() is 'supabase-aliyun-sms: outbox depth and the age of the oldest queued message, for the sidecar''s metrics.';

create or replace function sms.purge(p_keep interval default '30 days')
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    -- The outbox is also the record the 24-hour limits count.
    keep interval := greatest(p_keep, interval '1 day');
    codes_deleted integer;
    messages_deleted integer;
begin
    delete from sms.outbox as o
    where o.status in ('sent', 'failed') and o.created_at < now() - keep;
    get diagnostics messages_deleted = row_count;

    delete from sms.codes as c where c.expires_at < now() - keep;
    get diagnostics codes_deleted = row_count;

    return jsonb_build_object('codes', codes_deleted, 'messages', messages_deleted);
end
$$;
comment on function sms.purge(interval) is 'supabase-aliyun-sms retention: deletes codes expired, and delivered or failed messages (with their ledger rows) created, longer ago than p_keep (at least 1 day). Schedule with pg_cron: select cron.schedule(''sms-purge'', ''17 3 * * *'', ''select sms.purge()'');';

------------------------------------------------------------------------------------------------
-- Public API (PostgREST): thin security invoker wrappers
------------------------------------------------------------------------------------------------

create or replace function public.request_phone_code(phone text, purpose text default 'default')
returns jsonb
language plpgsql
volatile
security invoker
set search_path = pg_catalog, pg_temp
as $$
begin
    return sms.request_code(request_phone_code.phone, request_phone_code.purpose);
end
$$;
comment on function public.request_phone_code(text, text) is 'supabase-aliyun-sms: text a verification code to a phone. Returns {request_id, expires_in, retry_after}; HTTP 400 for a bad number, 429 over a limit.';

create or replace function public.verify_phone_code(phone text, code text, purpose text default 'default')
returns jsonb
language plpgsql
volatile
security invoker
set search_path = pg_catalog, pg_temp
as $$
begin
    return sms.verify_code(verify_phone_code.phone, verify_phone_code.code, verify_phone_code.purpose);
end
$$;
comment on function public.verify_phone_code(text, text, text) is 'supabase-aliyun-sms: check a code once. Returns {valid: true} or {valid: false, reason, attempts_left}, always HTTP 200.';

create or replace function public.phone_code_status(request_id uuid)
returns jsonb
language plpgsql
stable
security invoker
set search_path = pg_catalog, pg_temp
as $$
begin
    return sms.code_status(phone_code_status.request_id);
end
$$;
comment on function public.phone_code_status(uuid) is 'supabase-aliyun-sms: {status: queued|sending|sent|failed, error} of the caller''s own code request.';

------------------------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------------------------

revoke all on all functions in schema sms from public, anon, authenticated, service_role;
revoke all on function public.request_phone_code(text, text) from public, anon, authenticated, service_role;
revoke all on function public.verify_phone_code(text, text, text) from public, anon, authenticated, service_role;
revoke all on function public.phone_code_status(uuid) from public, anon, authenticated, service_role;

-- The wrappers run as the caller, so callers need the schema and the functions they wrap.
grant usage on schema sms to authenticated, service_role, sms_sidecar;
grant execute on function
    public.request_phone_code(text, text),
    public.verify_phone_code(text, text, text),
    public.phone_code_status(uuid),
    sms.request_code(text, text),
    sms.verify_code(text, text, text),
    sms.code_status(uuid)
to authenticated, service_role;

grant execute on function
    sms.schema_version(),
    sms.claim_messages(text, integer, integer),
    sms.finish_delivery(bigint, text, text, text, text, text, text, integer, integer, integer),
    sms.release_messages(text),
    sms.queue_stats(),
    sms.purge(interval),
    sms.grpc_send_code(text, text, text),
    sms.grpc_verify_code(text, text)
to sms_sidecar;

create or replace function sms.sync_anon_grants()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if new.allow_anon then
        grant usage on schema sms to anon;
        grant execute on function
            public.request_phone_code(text, text), public.verify_phone_code(text, text, text),
            public.phone_code_status(uuid), sms.request_code(text, text),
            sms.verify_code(text, text, text), sms.code_status(uuid)
        to anon;
    else
        revoke execute on function
            public.request_phone_code(text, text), public.verify_phone_code(text, text, text),
            public.phone_code_status(uuid), sms.request_code(text, text),
            sms.verify_code(text, text, text), sms.code_status(uuid)
        from anon;
        revoke usage on schema sms from anon;
    end if;
    new.updated_at := now();
    return new;
end
$$;
comment on function sms.sync_anon_grants() is 'supabase-aliyun-sms: makes the privileges follow sms.settings.allow_anon, so anon holds nothing while it is off.';
revoke all on function sms.sync_anon_grants() from public, anon, authenticated, service_role;

drop trigger if exists settings_sync_anon_grants on sms.settings;
create trigger settings_sync_anon_grants
    before insert or update on sms.settings
    for each row
    execute function sms.sync_anon_grants();

-- Bring the privileges in line with the current row (a re-run after an operator enabled anon).
update sms.settings set allow_anon = allow_anon where id;

notify pgrst, 'reload schema';
