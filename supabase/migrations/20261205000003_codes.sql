-- supabase-aliyun-sms 3/6: verification codes and the public API.
--
-- Codes belong to an owner (a user, the backend, the gRPC API, or an anonymous caller from one
-- address): a new code supersedes, and failed guesses invalidate, only that owner's codes.
-- One implementation each for issuing (sms._issue_code) and checking (sms._check_code); the
-- PostgREST path (request_code, verify_code, code_status behind the public wrappers) and the gRPC
-- path (grpc_send_code, grpc_verify_code) are thin callers that say who the owner is.

------------------------------------------------------------------------------------------------
-- Code material
------------------------------------------------------------------------------------------------

create or replace function sms._random_code(p_length integer)
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
comment on function sms._random_code(integer) is 'supabase-aliyun-sms: uniformly random digits from pgcrypto''s CSPRNG.';

create or replace function sms._hash_code(p_id uuid, p_code text)
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
comment on function sms._hash_code(uuid, text) is 'supabase-aliyun-sms: HMAC-SHA256 of a code, keyed by sms.secrets and salted with the code''s id.';

create or replace function sms._constant_time_equal(a bytea, b bytea)
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
comment on function sms._constant_time_equal(bytea, bytea) is 'supabase-aliyun-sms: compares every byte, so the time taken does not depend on where the inputs differ.';

------------------------------------------------------------------------------------------------
-- Issuing: one implementation, two callers
------------------------------------------------------------------------------------------------

create or replace function sms._issue_code(
    p_phone text,
    p_purpose text,
    p_owner text,
    p_user_id uuid,
    p_count_user boolean,
    p_ip_key text,
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
    s sms.settings := sms._current_settings();
    v_phone text;
    code_id uuid := gen_random_uuid();
    test_code text;
    code text;
    by_owner boolean;
    v_ip inet;
begin
    v_phone := sms._parse_phone(p_phone, s);
    perform sms._check_purpose(p_purpose);
    -- The backend and the gRPC API act for the number's owner; a user owns their Auth phone.
    by_owner := p_owner in ('service', 'grpc') or sms._owns_phone(p_user_id, v_phone);
    perform sms._enforce_send_limits(v_phone, p_owner, by_owner, case when p_count_user then p_user_id end, p_ip_key);
    if p_ip_key is not null and p_ip_key not in ('unknown', 'invalid') then
        v_ip := p_ip_key::inet;
    end if;

    update sms.codes as c
    set invalidated_at = now(), invalidated_reason = 'superseded'
    where c.phone = v_phone and c.purpose = p_purpose and c.owner = p_owner
      and c.consumed_at is null and c.invalidated_at is null;

    test_code := s.test_codes ->> v_phone;
    code := coalesce(test_code, sms._random_code(s.code_length));
    insert into sms.codes (id, phone, purpose, owner, user_id, code_hash, is_test, expires_at)
    values (code_id, v_phone, p_purpose, p_owner, p_user_id, sms._hash_code(code_id, code), test_code is not null,
            now() + make_interval(secs => s.code_ttl_seconds));

    -- A test number's message is recorded (so limits and status behave as for a real number) as
    -- already sent, and never reaches the queue.
    insert into sms.outbox (code_id, source, phone, purpose, user_id, client_ip, ip_key, requester, by_owner,
                            code, status, expires_at, sign_name, template_code, provider_code, sent_at)
    values (code_id, p_source, v_phone, p_purpose, p_user_id, v_ip, p_ip_key, p_owner, by_owner,
            case when test_code is null then code end, case when test_code is null then 'queued' else 'sent' end,
            now() + make_interval(secs => s.code_ttl_seconds),
            case when test_code is null then p_sign_name end, case when test_code is null then p_template_code end,
            case when test_code is not null then 'TEST_NUMBER' end, case when test_code is not null then now() end);

    return jsonb_build_object(
        'request_id', code_id,
        'expires_in', s.code_ttl_seconds,
        'retry_after', coalesce(s.resend_cooldown_seconds, 0)
    );
end
$$;
comment on function sms._issue_code(text, text, text, uuid, boolean, text, text, text, text) is 'supabase-aliyun-sms: issues a code for a phone and purpose owned by p_owner (superseding only that owner''s older codes), after the limits, and queues its SMS (with an optional sign name and template), or records a test number''s as sent. Internal: callers go through request_code or grpc_send_code.';

create or replace function sms.request_code(p_phone text, p_purpose text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms._current_settings();
    anonymous_user boolean := sms._caller_is_anonymous_user();
    owner text := sms._caller_owner();
begin
    perform sms._check_caller_allowed(s);
    if anonymous_user and not s.allow_anonymous_users then
        perform sms._raise_api_error(403, 'anonymous_user_not_allowed',
                                     'Anonymous sign-ins cannot request phone codes. 匿名用户不能获取验证码。');
    end if;
    -- A trusted backend calls from its own address; counting that against one IP would lock out
    -- everyone. Anonymous sign-ins are all fresh users, so only their address is counted.
    return sms._issue_code(
        p_phone, p_purpose, owner, sms._caller_uid(), not anonymous_user,
        case when owner <> 'service' then coalesce(sms._client_address(), case when anonymous_user then 'unknown' end) end,
        'rpc'
    );
end
$$;
comment on function sms.request_code(text, text) is 'supabase-aliyun-sms: issues a code owned by the caller (user, backend, or anonymous caller by address) and queues its SMS. Behind public.request_phone_code.';
grant execute on function sms.request_code(text, text) to authenticated, service_role;

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
        perform sms._raise_api_error(400, 'template_not_allowed',
                                     'this signature and template pair is not configured in sms.templates');
    end if;
    issued := sms._issue_code(p_phone, 'default', 'grpc', null, false, null, 'grpc', p_sign_name, p_template_code);
    -- The gRPC call waits for the delivery outcome (sms.message_state), as the original service did.
    return issued || jsonb_build_object(
        'message_id', (select o.id from sms.outbox as o where o.code_id = (issued ->> 'request_id')::uuid)
    );
end
$$;
comment on function sms.grpc_send_code(text, text, text) is 'supabase-aliyun-sms: SendSMS of the phone-number gRPC API: a code of purpose default owned by the gRPC API, with an operator-approved sign name and template.';
grant execute on function sms.grpc_send_code(text, text, text) to sms_grpc;

------------------------------------------------------------------------------------------------
-- Checking: one implementation, two callers
------------------------------------------------------------------------------------------------

create or replace function sms._check_code(p_phone text, p_code text, p_purpose text, p_owner text)
returns jsonb
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms._current_settings();
    v_phone text;
    c sms.codes;
    used integer;
begin
    v_phone := sms._parse_phone(p_phone, s);
    perform sms._check_purpose(p_purpose);
    if p_code is null or length(p_code) > 64 then
        perform sms._raise_api_error(400, 'invalid_code', 'code must be a string of at most 64 characters.');
    end if;

    -- Only the caller's own codes: nobody else's guesses count against them. The row lock
    -- serialises concurrent checks of the same code: one wins, the rest see it used (under
    -- REPEATABLE READ and SERIALIZABLE the rest fail with a serialization error instead).
    begin
        select * into c from sms.codes as x
        where x.phone = v_phone and x.purpose = p_purpose and x.owner = p_owner
        order by x.created_at desc
        limit 1
        for update;
    exception
        when serialization_failure or deadlock_detected then
            perform sms._raise_api_error(503, 'concurrent_request',
                                         'This code is being checked by another request; try again.',
                                         jsonb_build_object('retry_after', 1), 1);
    end;

    if not found or c.consumed_at is not null or c.invalidated_reason = 'superseded' then
        return jsonb_build_object('valid', false, 'reason', 'not_found', 'attempts_left', 0);
    end if;
    if c.invalidated_reason = 'too_many_attempts' then
        return jsonb_build_object('valid', false, 'reason', 'too_many_attempts', 'attempts_left', 0);
    end if;
    if c.expires_at <= now() then
        return jsonb_build_object('valid', false, 'reason', 'expired', 'attempts_left', 0);
    end if;

    if sms._constant_time_equal(sms._hash_code(c.id, p_code), c.code_hash) then
        update sms.codes set consumed_at = now() where id = c.id;
        return jsonb_build_object('valid', true);
    end if;

    update sms.codes set attempts = attempts + 1 where id = c.id returning attempts into used;
    if used >= s.max_attempts then
        update sms.codes as x
        set invalidated_at = now(), invalidated_reason = 'too_many_attempts'
        where x.phone = v_phone and x.purpose = p_purpose and x.owner = p_owner
          and x.consumed_at is null and x.invalidated_at is null;
        return jsonb_build_object('valid', false, 'reason', 'too_many_attempts', 'attempts_left', 0);
    end if;
    return jsonb_build_object('valid', false, 'reason', 'mismatch', 'attempts_left', s.max_attempts - used);
end
$$;
comment on function sms._check_code(text, text, text, text) is 'supabase-aliyun-sms: checks a code of p_owner once, counting failures (returned, never raised, so the count survives PostgREST''s rollback on error). Internal: callers go through verify_code or grpc_verify_code.';

create or replace function sms.verify_code(p_phone text, p_code text, p_purpose text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform sms._check_caller_allowed(sms._current_settings());
    return sms._check_code(p_phone, p_code, p_purpose, sms._caller_owner());
end
$$;
comment on function sms.verify_code(text, text, text) is 'supabase-aliyun-sms: checks a code owned by the caller. Behind public.verify_phone_code.';
grant execute on function sms.verify_code(text, text, text) to authenticated, service_role;

create or replace function sms.grpc_verify_code(p_phone text, p_code text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return sms._check_code(p_phone, p_code, 'default', 'grpc');
end
$$;
comment on function sms.grpc_verify_code(text, text) is 'supabase-aliyun-sms: Valid of the phone-number gRPC API: checks a code of purpose default owned by the gRPC API.';
grant execute on function sms.grpc_verify_code(text, text) to sms_grpc;

------------------------------------------------------------------------------------------------
-- Status
------------------------------------------------------------------------------------------------

create or replace function sms.code_status(p_request_id uuid)
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    code_owner text;
    found_status text;
    found_error text;
begin
    perform sms._check_caller_allowed(sms._current_settings());
    select c.owner, o.status, o.last_error into code_owner, found_status, found_error
    from sms.codes as c
    join sms.outbox as o on o.code_id = c.id
    where c.id = p_request_id;
    if not found or (code_owner is distinct from sms._caller_owner() and sms._caller_role() <> 'service_role') then
        perform sms._raise_api_error(404, 'request_not_found', 'No such code request for this caller.');
    end if;
    return jsonb_build_object(
        'status', found_status,
        'error', case when found_status = 'failed' then found_error end
    );
end
$$;
comment on function sms.code_status(uuid) is 'supabase-aliyun-sms: delivery status of the caller''s own code request (any request for service_role). Behind public.phone_code_status.';
grant execute on function sms.code_status(uuid) to authenticated, service_role;

------------------------------------------------------------------------------------------------
-- Public API (PostgREST): thin security invoker wrappers. Schema public hands new functions to
-- the API roles by default, so each wrapper first takes everything back.
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
revoke all on function public.request_phone_code(text, text) from public, anon, authenticated, service_role;
grant execute on function public.request_phone_code(text, text) to authenticated, service_role;

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
revoke all on function public.verify_phone_code(text, text, text) from public, anon, authenticated, service_role;
grant execute on function public.verify_phone_code(text, text, text) to authenticated, service_role;

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
revoke all on function public.phone_code_status(uuid) from public, anon, authenticated, service_role;
grant execute on function public.phone_code_status(uuid) to authenticated, service_role;

------------------------------------------------------------------------------------------------
-- Anonymous callers: the privileges follow sms.settings.allow_anon
------------------------------------------------------------------------------------------------

create or replace function sms._sync_anon_grants()
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
comment on function sms._sync_anon_grants() is 'supabase-aliyun-sms: makes the privileges follow sms.settings.allow_anon, so anon holds nothing while it is off.';

drop trigger if exists settings_sync_anon_grants on sms.settings;
create trigger settings_sync_anon_grants
    before insert or update on sms.settings
    for each row
    execute function sms._sync_anon_grants();

-- Bring the privileges in line with the current row (a re-run after an operator enabled anon).
update sms.settings set allow_anon = allow_anon where id;

-- New functions are PUBLIC's to execute until this (see 20261205000001_schema.sql); the grants stand
-- beside the functions.
revoke execute on all functions in schema sms from public;

notify pgrst, 'reload schema';
