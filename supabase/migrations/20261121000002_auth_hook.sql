-- supabase-aliyun-sms: Supabase Auth (GoTrue) Send SMS hook events.
--
-- The sidecar's HTTP hook verifies GoTrue's signature, then hands the event to sms.hook_begin,
-- which applies the same phone rules and limits as request_phone_code (so they hold across
-- replicas), deduplicates GoTrue's retries and leases the message to that sidecar to send at once.

alter table sms.outbox add column if not exists gotrue_shape text;
comment on column sms.outbox.gotrue_shape is 'Payload shape of the GoTrue event (flat, user+sms, +sms.phone, +metadata), which tells the GoTrue version.';

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261121000002'::text $$;

create or replace function sms.parse_auth_event(
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
        perform sms.raise_api_error(400, 'invalid_hook_payload', 'the hook payload must be a JSON object');
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
        perform sms.raise_api_error(400, 'invalid_hook_payload', 'the hook payload has no sms object');
    end if;
    if otp is null or otp !~ '^[0-9]{4,10}$' then
        perform sms.raise_api_error(400, 'invalid_hook_payload', 'sms.otp must be a string of 4 to 10 digits');
    end if;
    if phone is null then
        perform sms.raise_api_error(400, 'invalid_hook_payload', 'the hook payload names no phone number');
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
comment on function sms.parse_auth_event(jsonb) is 'supabase-aliyun-sms: reads a GoTrue Send SMS hook event of any version (flat, user+sms, with sms.phone, with metadata); raises HTTP 400 when it is not one.';

create or replace function sms.hook_begin(
    p_event jsonb,
    p_body_sha256 text,
    p_worker text,
    p_lease_seconds integer default 10
)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    e record;
    v_phone text;
    dedup text;
    m sms.outbox;
    delivery bigint;
    tmpl sms.templates;
begin
    e := sms.parse_auth_event(p_event);
    v_phone := sms.parse_phone(e.phone, s);
    -- GoTrue retries with a new webhook-id but the same body (and, since v2.187, the same uuid).
    dedup := coalesce('gotrue:' || e.event_id, 'sha256:' || p_body_sha256);
    perform pg_catalog.pg_advisory_xact_lock(hashtextextended('sms.hook:' || dedup, 0));

    select * into m from sms.outbox as o where o.dedup_key = dedup for update;
    if found then
        if m.status = 'sending' and m.lease_until < now() then
            -- Whoever held it died mid-send: it may have gone out, so it is not sent again.
            update sms.deliveries as d
            set finished_at = clock_timestamp(), outcome = 'ambiguous',
                provider_message = 'lease expired before the attempt finished'
            where d.message_id = m.id and d.finished_at is null;
            update sms.outbox as o
            set status = 'failed', code = null, lease_until = null, provider_code = 'NoResponse',
                last_error = 'an earlier attempt did not finish'
            where o.id = m.id
            returning * into m;
        end if;
        if m.status <> 'queued' or m.code is null then
            return jsonb_build_object('action', 'duplicate', 'message_id', m.id, 'status', m.status,
                                      'provider_code', m.provider_code, 'error', m.last_error);
        end if;
        -- Queued again after a failure known not to have reached the provider: send it now.
        update sms.outbox as o
        set status = 'sending', attempts = o.attempts + 1, locked_by = p_worker,
            lease_until = now() + make_interval(secs => p_lease_seconds)
        where o.id = m.id
        returning * into m;
    else
        perform sms.enforce_send_limits(v_phone, null, e.client_ip);
        if s.test_codes ? v_phone then
            -- A number the operator marked as never to be texted (see GOTRUE_SMS_TEST_OTP).
            insert into sms.outbox (source, phone, purpose, client_ip, status, expires_at, dedup_key,
                                    provider_code, sent_at, gotrue_shape)
            values ('auth_hook', v_phone, e.purpose, e.client_ip, 'sent',
                    now() + make_interval(secs => s.code_ttl_seconds), dedup, 'TEST_NUMBER', now(), e.shape)
            returning * into m;
            return jsonb_build_object('action', 'duplicate', 'message_id', m.id, 'status', 'sent',
                                      'provider_code', 'TEST_NUMBER', 'error', null);
        end if;
        insert into sms.outbox (source, phone, purpose, client_ip, code, status, attempts, locked_by,
                                lease_until, expires_at, dedup_key, gotrue_shape)
        values ('auth_hook', v_phone, e.purpose, e.client_ip, e.otp, 'sending', 1, p_worker,
                now() + make_interval(secs => p_lease_seconds),
                now() + make_interval(secs => s.code_ttl_seconds), dedup, e.shape)
        returning * into m;
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
comment on function sms.hook_begin(jsonb, text, text, integer) is 'supabase-aliyun-sms: for the sidecar''s HTTP hook. Validates a GoTrue event, applies the allow-list and the per-phone and per-IP limits (HTTP 400/429), deduplicates GoTrue''s retries, and leases a new message to the caller to send now ({"action": "send", ...}) or reports the earlier outcome ({"action": "duplicate", ...}).';

create or replace function sms.message_state(p_message_id uuid)
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return (
        select jsonb_build_object('status', o.status, 'provider_code', o.provider_code, 'error', o.last_error,
                                  'lease_until', o.lease_until)
        from sms.outbox as o
        where o.id = p_message_id
    );
end
$$;
comment on function sms.message_state(uuid) is 'supabase-aliyun-sms: status of one outbox message, for a sidecar waiting on a duplicate hook event another request is still sending.';

revoke all on function sms.parse_auth_event(jsonb) from public, anon, authenticated, service_role;
revoke all on function sms.hook_begin(jsonb, text, text, integer) from public, anon, authenticated, service_role;
revoke all on function sms.message_state(uuid) from public, anon, authenticated, service_role;
grant execute on function sms.hook_begin(jsonb, text, text, integer), sms.message_state(uuid) to sms_sidecar;

create or replace function sms.send_sms_hook(event jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    e record;
    v_phone text;
    dedup text;
    failure_message text;
    failure_detail text;
begin
    e := sms.parse_auth_event(event);
    v_phone := sms.parse_phone(e.phone, s);
    dedup := coalesce('gotrue:' || e.event_id, 'sha256:' || encode(sha256(convert_to(event::text, 'UTF8')), 'hex'));
    perform pg_catalog.pg_advisory_xact_lock(hashtextextended('sms.hook:' || dedup, 0));
    if exists (select from sms.outbox as o where o.dedup_key = dedup) then
        return '{}'::jsonb;
    end if;
    perform sms.enforce_send_limits(v_phone, null, e.client_ip);

    if s.test_codes ? v_phone then
        -- A number the operator marked as never to be texted (see GOTRUE_SMS_TEST_OTP).
        insert into sms.outbox (source, phone, purpose, client_ip, status, expires_at, dedup_key, provider_code,
                                sent_at, gotrue_shape)
        values ('pg_hook', v_phone, e.purpose, e.client_ip, 'sent', now() + make_interval(secs => s.code_ttl_seconds),
                dedup, 'TEST_NUMBER', now(), e.shape);
    else
        insert into sms.outbox (source, phone, purpose, client_ip, code, expires_at, dedup_key, gotrue_shape)
        values ('pg_hook', v_phone, e.purpose, e.client_ip, e.otp, now() + make_interval(secs => s.code_ttl_seconds),
                dedup, e.shape);
    end if;
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
grant usage on schema sms to supabase_auth_admin;
grant execute on function sms.send_sms_hook(jsonb) to supabase_auth_admin;
