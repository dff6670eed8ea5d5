-- supabase-aliyun-sms 5/6: Supabase Auth (GoTrue) Send SMS hook events.
--
-- Two ways in, one implementation (sms._begin_hook_message): the sidecar's HTTP hook verifies
-- GoTrue's signature and hands the events over through sms.hook_begin_many, which leases each new
-- message to that sidecar to send at once; GoTrue's Postgres-function hook (sms.send_sms_hook)
-- only queues the message for the worker. Both apply the same phone rules and limits as
-- request_phone_code (so they hold across replicas) and deduplicate GoTrue's retries. GoTrue texts
-- the number that signs in, so these sends are the owner's (requester auth).
--
-- The sidecar's path is kept short: hook_begin_many calls the implementation directly, which
-- inserts its message and opens its attempt itself, and both run with generic plans (the same plan
-- whatever the phone: re-planning for each call's parameters cost more than any plan it found).

create or replace function sms._parse_auth_event(
    p_event jsonb,
    out phone text,
    out otp text,
    out purpose text,
    out client_ip inet,
    out event_id text,
    out shape text
)
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    payload jsonb := p_event -> 'sms';
begin
    if jsonb_typeof(p_event) is distinct from 'object' then
        perform sms._raise_api_error(400, 'invalid_hook_payload', 'the hook payload must be a JSON object');
    end if;
    if jsonb_typeof(payload) = 'object' then
        otp := payload ->> 'otp';
        -- sms.phone is the number to text (the new one on phone change, the factor's for MFA);
        -- user.phone only for GoTrue before v2.180, which did not send sms.phone.
        phone := coalesce(nullif(payload ->> 'phone', ''), nullif(p_event -> 'user' ->> 'phone', ''));
        purpose := case when payload ->> 'sms_type' = 'mfa' then 'mfa' else 'default' end;
        shape := case
            when jsonb_typeof(p_event -> 'metadata') = 'object' then 'metadata'
            when payload ? 'phone' then 'sms.phone'
            else 'user+sms'
        end;
    elsif p_event ? 'otp' then
        otp := p_event ->> 'otp';
        phone := nullif(p_event ->> 'phone', '');
        purpose := 'default';
        shape := 'flat';
    else
        perform sms._raise_api_error(400, 'invalid_hook_payload', 'the hook payload has no sms object');
    end if;
    if otp is null or otp !~ '^[0-9]{4,10}$' then
        perform sms._raise_api_error(400, 'invalid_hook_payload', 'sms.otp must be a string of 4 to 10 digits');
    end if;
    if phone is null then
        perform sms._raise_api_error(400, 'invalid_hook_payload', 'the hook payload names no phone number');
    end if;
    -- GoTrue stores and sends E.164 digits without the +: 14155550123 is +1 415, never a bare
    -- mainland number (the bare-number reading is for what people type into request_phone_code).
    if phone ~ '^[0-9]+$' then
        phone := '+' || phone;
    end if;
    event_id := nullif(p_event -> 'metadata' ->> 'uuid', '');
    begin
        client_ip := nullif(p_event -> 'metadata' ->> 'ip_address', '')::inet;
    exception
        when others then
            client_ip := null;
    end;
end
$$;
comment on function sms._parse_auth_event(jsonb) is 'supabase-aliyun-sms: reads a GoTrue Send SMS hook event of any version (flat, user+sms, with sms.phone, with metadata); raises HTTP 400 when it is not one.';


create or replace function sms._begin_hook_message(
    p_event jsonb,
    p_body_sha256 text,
    p_source text,
    p_worker text default null,
    p_lease_seconds integer default null
)
returns jsonb
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms._current_settings();
    e record;
    v_phone text;
    v_ip_key text;
    dedup text;
    test_number boolean;
    leased boolean := p_source = 'auth_hook';
    send_now boolean := false;
    m sms.outbox;
    delivery bigint;
    tmpl sms.templates;
begin
    e := sms._parse_auth_event(p_event);
    v_phone := sms._parse_phone(e.phone, s);
    v_ip_key := sms._ip_key(e.client_ip);
    -- GoTrue retries with a new webhook-id but the same body (and, since v2.187, the same uuid).
    dedup := coalesce('gotrue:' || e.event_id, 'sha256:' || p_body_sha256);
    perform pg_advisory_xact_lock(hashtextextended('sms.hook:' || dedup, 0));

    if leased then
        select * into m from sms.outbox as o where o.dedup_key = dedup for update;
    elsif exists (select from sms.outbox as o where o.dedup_key = dedup) then
        -- The Postgres-function hook only queues: its retry finds the message queued already.
        return jsonb_build_object('action', 'duplicate');
    end if;

    if m.id is null then
        perform sms._enforce_send_limits(v_phone, 'auth', true, null, v_ip_key);
        -- A test number is recorded as sent and never texted (see GOTRUE_SMS_TEST_OTP); any other
        -- message is leased to the caller to send now (HTTP hook) or queued for the worker.
        test_number := s.test_codes ? v_phone;
        send_now := leased and not test_number;
        insert into sms.outbox (source, phone, purpose, client_ip, ip_key, requester, code, status, attempts,
                                locked_by, lease_until, expires_at, dedup_key, provider_code, sent_at, gotrue_shape)
        values (p_source, v_phone, e.purpose, e.client_ip, v_ip_key, 'auth',
                case when not test_number then e.otp end,
                case when test_number then 'sent' when send_now then 'sending' else 'queued' end,
                case when send_now then 1 else 0 end,
                case when send_now then p_worker end,
                case when send_now then now() + make_interval(secs => p_lease_seconds) end,
                now() + make_interval(secs => s.code_ttl_seconds), dedup,
                case when test_number then 'TEST_NUMBER' end, case when test_number then now() end, e.shape)
        returning * into m;
    elsif m.status = 'sending' and m.lease_until < now() then
        -- Whoever held it died mid-send: it may have gone out, so it is not sent again.
        perform sms._close_open_attempts(array[m.id]);
        update sms.outbox as o
        set status = 'failed', code = null, lease_until = null, provider_code = 'NoResponse',
            last_error = 'an earlier attempt did not finish'
        where o.id = m.id
        returning * into m;
    elsif m.status = 'queued' and m.code is not null then
        -- Queued again after a failure known not to have reached the provider: send it now.
        m := sms._lease_message(m.id, p_worker, p_lease_seconds);
        send_now := true;
    end if;

    if not send_now then
        return jsonb_build_object('action', 'duplicate', 'message_id', m.id, 'status', m.status,
                                  'provider_code', m.provider_code, 'error', m.last_error);
    end if;

    insert into sms.deliveries (message_id, attempt, worker)
    values (m.id, m.attempts, p_worker)
    returning id into delivery;
    select * into tmpl from sms.templates as t where t.purpose = m.purpose;

    return jsonb_build_object(
        'action', 'send',
        'message_id', m.id,
        'delivery_id', delivery,
        'attempt', m.attempts,
        'phone', m.phone,
        'code', m.code,
        'purpose', m.purpose,
        'shape', m.gotrue_shape,
        'sign_name', tmpl.sign_name,
        'template_code', tmpl.template_code
    );
end
$$;
comment on function sms._begin_hook_message(jsonb, text, text, text, integer) is 'supabase-aliyun-sms: one GoTrue Send SMS event, p_source auth_hook (the sidecar''s HTTP hook) or pg_hook (the Postgres-function hook). Validates it, applies the allow-list and the per-phone and per-IP limits (HTTP 400/429), deduplicates GoTrue''s retries by p_body_sha256 or metadata.uuid; for auth_hook leases a new message to p_worker to send now ({"action": "send", ...}) or reports the earlier outcome or a test number ({"action": "duplicate", ...}); for pg_hook queues it for the worker.';

create or replace function sms.hook_begin_many(p_requests jsonb, p_worker text, p_lease_seconds integer default 10)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    r jsonb;
    answers jsonb := '[]';
    answer jsonb;
    body text;
    meta text;
begin
    if jsonb_typeof(p_requests) is distinct from 'array' then
        raise exception 'sms.hook_begin_many takes a JSON array of {event, body_sha256}' using errcode = '22023';
    end if;
    for r in select value from jsonb_array_elements(p_requests) loop
        -- One request's refusal (400, 429, 503) is its answer and undoes only its own work; any
        -- other error fails the statement, and the sidecar then begins each request alone. Two
        -- statements (two sidecar processes) that need the same phone's or address's limit lock in
        -- opposite orders meet PostgreSQL's deadlock check: one request is refused with 503
        -- concurrent_request (retry), the rest go on.
        begin
            answer := sms._begin_hook_message(r -> 'event', r ->> 'body_sha256', 'auth_hook', p_worker, p_lease_seconds);
        exception
            when sqlstate 'PGRST' then
                get stacked diagnostics body = message_text, meta = pg_exception_detail;
                answer := jsonb_build_object('action', 'refused', 'error', body::jsonb, 'meta', meta::jsonb);
        end;
        answers := answers || jsonb_build_array(answer);
    end loop;
    return answers;
end
$$;
comment on function sms.hook_begin_many(jsonb, text, integer) is 'supabase-aliyun-sms: for the sidecar''s HTTP hook, sms._begin_hook_message for each element of a JSON array ({event, body_sha256}), in order, in one statement; returns the array of their answers ({"action": "send", ...} or {"action": "duplicate", ...}), a refusal (what sms._raise_api_error raised) as {"action": "refused", "error": <body>, "meta": <status and headers>}. The events that arrive while one such statement runs go in the next one; each request still waits for the commit of its own lease before it sends.';
grant execute on function sms.hook_begin_many(jsonb, text, integer) to sms_sidecar;

create or replace function sms.send_sms_hook(event jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    failure_message text;
    failure_detail text;
begin
    perform sms._begin_hook_message(event, encode(sha256(convert_to(event::text, 'UTF8')), 'hex'), 'pg_hook');
    return '{}'::jsonb;
exception
    -- GoTrue turns a raised exception into a bare 500; an error object reaches the user with its
    -- status and message, on every GoTrue version of this hook path.
    when sqlstate 'PGRST' then
        get stacked diagnostics failure_message = message_text, failure_detail = pg_exception_detail;
        return jsonb_build_object('error', jsonb_build_object(
            'http_code', (failure_detail::jsonb ->> 'status')::integer,
            'message', failure_message::jsonb ->> 'message'
        ));
end
$$;
comment on function sms.send_sms_hook(jsonb) is 'supabase-aliyun-sms: Postgres-function target for GoTrue (GOTRUE_HOOK_SEND_SMS_URI=pg-functions://postgres/sms/send_sms_hook). Queues the OTP GoTrue generated for the sidecar''s worker, after the allow-list and per-phone/per-IP limits; returns {} or GoTrue''s error object. Executable by supabase_auth_admin only.';
revoke all on function sms.send_sms_hook(jsonb) from public, anon, authenticated, service_role;
grant execute on function sms.send_sms_hook(jsonb) to supabase_auth_admin;

-- New functions are PUBLIC's to execute until this (see 20261205000001_schema.sql); the grants stand
-- beside the functions.
revoke execute on all functions in schema sms from public;
