-- supabase-aliyun-sms: who owns which code and which sending budget; hardening.
--
-- * Codes belong to an owner (a user, the backend, the gRPC API, or an anonymous caller from one
--   address): a new code supersedes, and failed guesses invalidate, only that owner's codes.
-- * Every send is counted against its requester, and sends by anyone who does not own the number
--   share a small budget per phone, so others can neither lock the owner out nor bomb the number.
-- * Limits serialise on rows of sms.limit_locks instead of advisory locks: under REPEATABLE READ or
--   SERIALIZABLE a concurrent send fails the request with a retryable error instead of going
--   unseen by this transaction's snapshot.
-- * Client addresses are counted per host (IPv4, IPv4-mapped IPv6 as IPv4, IPv6 per /64), and an
--   address header that is not an address counts in one shared bucket instead of switching the
--   per-IP limit off.
-- * Every function pins search_path = pg_catalog, pg_temp: an empty search_path still resolves
--   type names from pg_temp first, where a caller can plant a domain whose check runs as owner.
-- * Each role gets exactly what its process calls: sms.purge is the operator's (pg_cron), the
--   gRPC functions belong to sms_grpc.

------------------------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------------------------

alter table sms.settings add column if not exists hourly_limit_per_phone integer default 5
    check (hourly_limit_per_phone >= 1);
alter table sms.settings add column if not exists others_hourly_limit_per_phone integer default 2
    check (others_hourly_limit_per_phone >= 0);
alter table sms.settings add column if not exists others_daily_limit_per_phone integer default 3
    check (others_daily_limit_per_phone >= 0);
alter table sms.settings add column if not exists allow_anonymous_users boolean not null default true;
comment on column sms.settings.hourly_limit_per_phone is 'Sends per phone per hour, whoever asks (Aliyun''s own default is 5 per number and sign). NULL disables.';
comment on column sms.settings.others_hourly_limit_per_phone is 'Of the phone''s sends in an hour, how many may be asked for by callers who do not own the number (another user, an anonymous caller); the rest stays the owner''s. NULL disables.';
comment on column sms.settings.others_daily_limit_per_phone is 'The same as others_hourly_limit_per_phone over 24 hours. NULL disables.';
comment on column sms.settings.allow_anonymous_users is 'Whether Supabase anonymous sign-ins (JWT is_anonymous) may request codes. They are counted per address only: every anonymous sign-in is a fresh user.';

------------------------------------------------------------------------------------------------
-- Owners and requesters
------------------------------------------------------------------------------------------------

alter table sms.codes add column if not exists owner text;
update sms.codes as c
set owner = case
    when c.user_id is not null then 'user:' || c.user_id::text
    when exists (select from sms.outbox as o where o.code_id = c.id and o.source = 'grpc') then 'grpc'
    else 'service'
end
where c.owner is null;
alter table sms.codes alter column owner set not null;
comment on column sms.codes.owner is 'Who may verify the code, and whose codes a new one supersedes: user:<uuid>, service (service_role or a direct connection), grpc, or anon:<address>.';

drop index if exists sms.codes_one_outstanding_idx;
create unique index if not exists codes_one_outstanding_per_owner_idx on sms.codes (phone, purpose, owner)
    where consumed_at is null and invalidated_at is null;
drop index if exists sms.codes_phone_purpose_created_idx;
create index if not exists codes_phone_purpose_owner_created_idx on sms.codes (phone, purpose, owner, created_at desc);
comment on table sms.codes is 'supabase-aliyun-sms verification codes, HMAC-SHA256 only (keyed by sms.secrets, salted by id). At most one outstanding code per phone, purpose and owner.';

alter table sms.outbox add column if not exists requester text;
alter table sms.outbox add column if not exists by_owner boolean not null default true;
alter table sms.outbox add column if not exists ip_key text;
comment on column sms.outbox.requester is 'Who asked for this SMS (user:<uuid>, service, grpc, auth, anon:<address>); the resend cooldown is per phone and requester.';
comment on column sms.outbox.by_owner is 'False when the requester does not own the number: such sends share the phone''s others_* budget.';
comment on column sms.outbox.ip_key is 'The client address as the per-IP limit counts it (IPv4 host, IPv6 /64, or invalid/unknown).';
-- The cooldown (phone and requester) reads the few rows of one phone through outbox_phone_created_idx:
-- no index of its own, since every status change of a row rewrites all of them (no HOT update).
create index if not exists outbox_ip_key_created_idx on sms.outbox (ip_key, created_at desc) where ip_key is not null;
drop index if exists sms.outbox_ip_created_idx;

create table if not exists sms.limit_locks (
    key text primary key,
    touched_at timestamptz not null default now()
);
comment on table sms.limit_locks is 'supabase-aliyun-sms: one row per phone, user and address that asked for an SMS. Requests update their rows before counting, which serialises them and makes a concurrent send a serialization failure under REPEATABLE READ and SERIALIZABLE.';
alter table sms.limit_locks enable row level security;
revoke all on sms.limit_locks from public, anon, authenticated, service_role;

------------------------------------------------------------------------------------------------
-- Addresses
------------------------------------------------------------------------------------------------

create or replace function sms.ip_key(p_ip pg_catalog.inet)
returns text
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v4 text;
begin
    if p_ip is null then
        return null;
    end if;
    if family(p_ip) = 6 then
        v4 := substring(host(p_ip) from '^::ffff:([0-9.]+)$');
        if v4 is not null then
            return v4;
        end if;
        -- One host can pick any address of its /64: count the /64.
        return host(network(set_masklen(p_ip, 64))) || '/64';
    end if;
    return host(p_ip);
end
$$;
comment on function sms.ip_key(inet) is 'supabase-aliyun-sms: the key the per-IP limit counts an address under: the IPv4 host without netmask (also for ::ffff:a.b.c.d), or the IPv6 /64.';

create or replace function sms.client_address()
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    h jsonb;
    forwarded text[];
    candidate text;
    parsed inet;
begin
    h := nullif(current_setting('request.headers', true), '')::jsonb;
    if h is null then
        return null;  -- not a PostgREST request
    end if;
    -- Kong overwrites X-Real-IP with the peer it saw; the right-most X-Forwarded-For entry is the
    -- one the nearest proxy appended. Entries further left are whatever the client sent.
    candidate := nullif(btrim(h ->> 'x-real-ip'), '');
    if candidate is null and h ? 'x-forwarded-for' then
        forwarded := regexp_split_to_array(h ->> 'x-forwarded-for', '\s*,\s*');
        candidate := nullif(btrim(forwarded[cardinality(forwarded)]), '');
    end if;
    if candidate is null then
        return null;  -- no proxy in front (Kong always sets X-Real-IP): nothing to count
    end if;
    begin
        parsed := candidate::inet;
    exception
        when others then
            return 'invalid';
    end;
    return sms.ip_key(parsed);
end
$$;
comment on function sms.client_address() is 'supabase-aliyun-sms: the per-IP limit key of a PostgREST request (X-Real-IP, else the last X-Forwarded-For entry): see sms.ip_key; invalid when the header is not an address (one shared bucket, so garbage cannot switch the limit off); NULL without either header.';

create or replace function sms.client_ip()
returns inet
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    k text := sms.client_address();
begin
    if k is null or k in ('unknown', 'invalid') then
        return null;
    end if;
    return k::inet;
end
$$;
comment on function sms.client_ip() is 'supabase-aliyun-sms: client address of a PostgREST request as sms.client_address counts it, or NULL.';

------------------------------------------------------------------------------------------------
-- Callers
------------------------------------------------------------------------------------------------

create or replace function sms.caller_owner()
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    uid uuid := sms.caller_uid();
begin
    if sms.caller_role() in ('service_role', '') then
        return 'service';
    end if;
    if uid is not null then
        return 'user:' || uid::text;
    end if;
    -- Anonymous callers are told apart only by their address.
    return 'anon:' || coalesce(sms.client_address(), 'unknown');
end
$$;
comment on function sms.caller_owner() is 'supabase-aliyun-sms: the owner key of the calling request: service (service_role or no JWT), user:<uuid>, or anon:<address>.';

create or replace function sms.caller_is_anonymous_user()
returns boolean
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce((sms.request_claims() ->> 'is_anonymous')::boolean, false);
exception
    when invalid_text_representation then
        return true;  -- unreadable: treat it as the more restricted kind
end
$$;
comment on function sms.caller_is_anonymous_user() is 'supabase-aliyun-sms: whether the JWT is a Supabase anonymous sign-in (is_anonymous).';

create or replace function sms.owns_phone(p_user_id uuid, p_phone text)
returns boolean
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    owned boolean;
begin
    if p_user_id is null or to_regclass('auth.users') is null then
        return false;
    end if;
    -- Dynamic, so the migration also loads where auth.users does not exist (yet).
    execute 'select exists (select from auth.users as u where u.id = $1 and u.phone = $2)'
        into owned using p_user_id, p_phone;
    return owned;
exception
    when insufficient_privilege or undefined_column then
        return false;
end
$$;
comment on function sms.owns_phone(uuid, text) is 'supabase-aliyun-sms: whether the number is the user''s own confirmed-or-not Auth phone (auth.users.phone, E.164 digits).';

------------------------------------------------------------------------------------------------
-- Limits
------------------------------------------------------------------------------------------------

drop function if exists sms.enforce_send_limits(text, uuid, inet);

create or replace function sms.window_frees_at(p_sends timestamptz[], p_limit integer, p_window interval)
returns timestamptz
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    -- For an N-per-window limit, the N-th most recent send in the window decides when a slot frees;
    -- a limit of 0 allows nothing for a whole window.
    select case
        when p_limit = 0 then now() + p_window
        else (select s.t + p_window from unnest(p_sends) as s (t)
              where s.t > now() - p_window order by s.t desc offset p_limit - 1 limit 1)
    end
    where p_limit is not null
$$;
comment on function sms.window_frees_at(timestamptz[], integer, interval) is 'supabase-aliyun-sms: when an N-per-window limit (NULL: none) next allows a send, given the send times; NULL when it allows one now.';

create or replace function sms.enforce_send_limits(
    p_phone text,
    p_requester text,
    p_by_owner boolean,
    p_user_id uuid,
    p_ip_key text
)
returns void
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    phone_sends timestamptz[];
    others_sends timestamptz[];
    own_last timestamptz;
    wait_until timestamptz;
    hit text[];
    seconds integer;
begin
    -- Row locks on one row per phone, user and address, taken in one sorted statement (so two
    -- requests never wait on each other in opposite orders). Under READ COMMITTED each count below
    -- then sees every send committed before; under REPEATABLE READ / SERIALIZABLE a send committed
    -- after this transaction's snapshot makes the update fail instead of going uncounted.
    begin
        insert into sms.limit_locks as l (key)
        select k from unnest(array['phone:' || p_phone, 'user:' || p_user_id::text, 'ip:' || p_ip_key]) as k
        where k is not null
        order by k
        on conflict (key) do update set touched_at = now();
    exception
        when serialization_failure or deadlock_detected then
            perform sms.raise_api_error(
                503, 'concurrent_request',
                'Another request for this number is being processed; try again. 请求过于频繁，请稍后重试。',
                jsonb_build_object('retry_after', 1), 1
            );
    end;

    -- The phone's sends, read once for every per-phone limit (the cooldown may look further back).
    select coalesce(array_agg(o.created_at), '{}'),
           coalesce(array_agg(o.created_at) filter (where not o.by_owner), '{}'),
           max(o.created_at) filter (where o.requester = p_requester)
    into phone_sends, others_sends, own_last
    from sms.outbox as o
    where o.phone = p_phone
      and o.created_at > now() - greatest(interval '24 hours', make_interval(secs => coalesce(s.resend_cooldown_seconds, 0)));

    select array_agg(l.name order by l.ord), max(l.frees_at) into hit, wait_until
    from (values
        (1, 'resend_cooldown', own_last + make_interval(secs => s.resend_cooldown_seconds)),
        (2, 'hourly_limit_per_phone', sms.window_frees_at(phone_sends, s.hourly_limit_per_phone, interval '1 hour')),
        (3, 'daily_limit_per_phone', sms.window_frees_at(phone_sends, s.daily_limit_per_phone, interval '24 hours')),
        (4, 'others_hourly_limit_per_phone', case when not p_by_owner then
            sms.window_frees_at(others_sends, s.others_hourly_limit_per_phone, interval '1 hour') end),
        (5, 'others_daily_limit_per_phone', case when not p_by_owner then
            sms.window_frees_at(others_sends, s.others_daily_limit_per_phone, interval '24 hours') end),
        (6, 'hourly_limit_per_user', case when p_user_id is not null and s.hourly_limit_per_user is not null then
            sms.window_frees_at(array(select o.created_at from sms.outbox as o
                                      where o.user_id = p_user_id and o.created_at > now() - interval '1 hour'
                                      order by o.created_at desc limit s.hourly_limit_per_user),
                                s.hourly_limit_per_user, interval '1 hour') end),
        (7, 'hourly_limit_per_ip', case when p_ip_key is not null and s.hourly_limit_per_ip is not null then
            sms.window_frees_at(array(select o.created_at from sms.outbox as o
                                      where o.ip_key = p_ip_key and o.created_at > now() - interval '1 hour'
                                      order by o.created_at desc limit s.hourly_limit_per_ip),
                                s.hourly_limit_per_ip, interval '1 hour') end)
    ) as l (ord, name, frees_at)
    where l.frees_at > now();

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
comment on function sms.enforce_send_limits(text, text, boolean, uuid, text) is 'supabase-aliyun-sms: raises HTTP 429 (with Retry-After) when one more SMS to this phone, by this requester, for this user or from this address would break a limit in sms.settings; HTTP 503 (retry) when a concurrent request for the same keys committed after this transaction''s snapshot.';

------------------------------------------------------------------------------------------------
-- Verification codes
------------------------------------------------------------------------------------------------

drop function if exists sms.issue_code(text, text, uuid, inet, text, text, text);

create or replace function sms.issue_code(
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
    s sms.settings := sms.current_settings();
    v_phone text;
    code_id uuid := gen_random_uuid();
    test_code text;
    code text;
    by_owner boolean;
    v_ip inet;
begin
    v_phone := sms.parse_phone(p_phone, s);
    perform sms.check_purpose(p_purpose);
    -- The backend and the gRPC API act for the number's owner; a user owns their Auth phone.
    by_owner := p_owner in ('service', 'grpc') or sms.owns_phone(p_user_id, v_phone);
    perform sms.enforce_send_limits(v_phone, p_owner, by_owner, case when p_count_user then p_user_id end, p_ip_key);
    if p_ip_key is not null and p_ip_key not in ('unknown', 'invalid') then
        v_ip := p_ip_key::inet;
    end if;

    update sms.codes as c
    set invalidated_at = now(), invalidated_reason = 'superseded'
    where c.phone = v_phone and c.purpose = p_purpose and c.owner = p_owner
      and c.consumed_at is null and c.invalidated_at is null;

    test_code := s.test_codes ->> v_phone;
    code := coalesce(test_code, sms.random_code(s.code_length));
    insert into sms.codes (id, phone, purpose, owner, user_id, code_hash, is_test, expires_at)
    values (code_id, v_phone, p_purpose, p_owner, p_user_id, sms.code_hash(code_id, code), test_code is not null,
            now() + make_interval(secs => s.code_ttl_seconds));

    if test_code is null then
        insert into sms.outbox (code_id, source, phone, purpose, user_id, client_ip, ip_key, requester, by_owner,
                                code, expires_at, sign_name, template_code)
        values (code_id, p_source, v_phone, p_purpose, p_user_id, v_ip, p_ip_key, p_owner, by_owner, code,
                now() + make_interval(secs => s.code_ttl_seconds), p_sign_name, p_template_code);
    else
        -- Recorded (so limits and status behave as for a real number) but never sent.
        insert into sms.outbox (code_id, source, phone, purpose, user_id, client_ip, ip_key, requester, by_owner,
                                status, expires_at, provider_code, sent_at)
        values (code_id, p_source, v_phone, p_purpose, p_user_id, v_ip, p_ip_key, p_owner, by_owner, 'sent',
                now() + make_interval(secs => s.code_ttl_seconds), 'TEST_NUMBER', now());
    end if;

    return jsonb_build_object(
        'request_id', code_id,
        'expires_in', s.code_ttl_seconds,
        'retry_after', coalesce(s.resend_cooldown_seconds, 0)
    );
end
$$;
comment on function sms.issue_code(text, text, text, uuid, boolean, text, text, text, text) is 'supabase-aliyun-sms: issues a code for a phone and purpose owned by p_owner (superseding only that owner''s older codes), after the limits, and queues its SMS (with an optional sign name and template). Internal: callers go through request_code or grpc_send_code.';

create or replace function sms.request_code(p_phone text, p_purpose text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s sms.settings := sms.current_settings();
    anonymous_user boolean := sms.caller_is_anonymous_user();
    owner text := sms.caller_owner();
begin
    perform sms.check_caller_allowed(s);
    if anonymous_user and not s.allow_anonymous_users then
        perform sms.raise_api_error(403, 'anonymous_user_not_allowed',
                                    'Anonymous sign-ins cannot request phone codes. 匿名用户不能获取验证码。');
    end if;
    -- A trusted backend calls from its own address; counting that against one IP would lock out
    -- everyone. Anonymous sign-ins are all fresh users, so only their address is counted.
    return sms.issue_code(
        p_phone, p_purpose, owner, sms.caller_uid(), not anonymous_user,
        case when owner <> 'service' then coalesce(sms.client_address(), case when anonymous_user then 'unknown' end) end,
        'rpc'
    );
end
$$;
comment on function sms.request_code(text, text) is 'supabase-aliyun-sms: issues a code owned by the caller (user, backend, or anonymous caller by address) and queues its SMS. Behind public.request_phone_code.';

drop function if exists sms.check_code(text, text, text, uuid);

create or replace function sms.check_code(p_phone text, p_code text, p_purpose text, p_owner text)
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
            perform sms.raise_api_error(503, 'concurrent_request',
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

    if sms.constant_time_equal(sms.code_hash(c.id, p_code), c.code_hash) then
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
comment on function sms.check_code(text, text, text, text) is 'supabase-aliyun-sms: checks a code of p_owner once, counting failures (returned, never raised, so the count survives PostgREST''s rollback on error). Internal: callers go through verify_code or grpc_verify_code.';

create or replace function sms.verify_code(p_phone text, p_code text, p_purpose text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform sms.check_caller_allowed(sms.current_settings());
    return sms.check_code(p_phone, p_code, p_purpose, sms.caller_owner());
end
$$;
comment on function sms.verify_code(text, text, text) is 'supabase-aliyun-sms: checks a code owned by the caller. Behind public.verify_phone_code.';

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
    issued := sms.issue_code(p_phone, 'default', 'grpc', null, false, null, 'grpc', p_sign_name, p_template_code);
    -- The gRPC call waits for the delivery outcome (sms.message_state), as the original service did.
    return issued || jsonb_build_object(
        'message_id', (select o.id from sms.outbox as o where o.code_id = (issued ->> 'request_id')::uuid)
    );
end
$$;
comment on function sms.grpc_send_code(text, text, text) is 'supabase-aliyun-sms: SendSMS of the phone-number gRPC API: a code of purpose default owned by the gRPC API, with an operator-approved sign name and template.';

create or replace function sms.grpc_verify_code(p_phone text, p_code text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return sms.check_code(p_phone, p_code, 'default', 'grpc');
end
$$;
comment on function sms.grpc_verify_code(text, text) is 'supabase-aliyun-sms: Valid of the phone-number gRPC API: checks a code of purpose default owned by the gRPC API.';

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
    perform sms.check_caller_allowed(sms.current_settings());
    select c.owner, o.status, o.last_error into code_owner, found_status, found_error
    from sms.codes as c
    join sms.outbox as o on o.code_id = c.id
    where c.id = p_request_id;
    if not found or (code_owner is distinct from sms.caller_owner() and sms.caller_role() <> 'service_role') then
        perform sms.raise_api_error(404, 'request_not_found', 'No such code request for this caller.');
    end if;
    return jsonb_build_object(
        'status', found_status,
        'error', case when found_status = 'failed' then found_error end
    );
end
$$;
comment on function sms.code_status(uuid) is 'supabase-aliyun-sms: delivery status of the caller''s own code request (any request for service_role). Behind public.phone_code_status.';

------------------------------------------------------------------------------------------------
-- Auth hook paths: GoTrue texts the number that signs in, so these sends are the owner's.
------------------------------------------------------------------------------------------------

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
    v_ip_key text;
    dedup text;
    m sms.outbox;
    delivery bigint;
    tmpl sms.templates;
begin
    e := sms.parse_auth_event(p_event);
    v_phone := sms.parse_phone(e.phone, s);
    v_ip_key := sms.ip_key(e.client_ip);
    -- GoTrue retries with a new webhook-id but the same body (and, since v2.187, the same uuid).
    dedup := coalesce('gotrue:' || e.event_id, 'sha256:' || p_body_sha256);
    perform pg_advisory_xact_lock(hashtextextended('sms.hook:' || dedup, 0));

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
        perform sms.enforce_send_limits(v_phone, 'auth', true, null, v_ip_key);
        if s.test_codes ? v_phone then
            -- A number the operator marked as never to be texted (see GOTRUE_SMS_TEST_OTP).
            insert into sms.outbox (source, phone, purpose, client_ip, ip_key, requester, status, expires_at,
                                    dedup_key, provider_code, sent_at, gotrue_shape)
            values ('auth_hook', v_phone, e.purpose, e.client_ip, v_ip_key, 'auth', 'sent',
                    now() + make_interval(secs => s.code_ttl_seconds), dedup, 'TEST_NUMBER', now(), e.shape)
            returning * into m;
            return jsonb_build_object('action', 'duplicate', 'message_id', m.id, 'status', 'sent',
                                      'provider_code', 'TEST_NUMBER', 'error', null);
        end if;
        insert into sms.outbox (source, phone, purpose, client_ip, ip_key, requester, code, status, attempts,
                                locked_by, lease_until, expires_at, dedup_key, gotrue_shape)
        values ('auth_hook', v_phone, e.purpose, e.client_ip, v_ip_key, 'auth', e.otp, 'sending', 1, p_worker,
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
    v_ip_key text;
    dedup text;
    failure_message text;
    failure_detail text;
begin
    e := sms.parse_auth_event(event);
    v_phone := sms.parse_phone(e.phone, s);
    v_ip_key := sms.ip_key(e.client_ip);
    dedup := coalesce('gotrue:' || e.event_id, 'sha256:' || encode(sha256(convert_to(event::text, 'UTF8')), 'hex'));
    perform pg_advisory_xact_lock(hashtextextended('sms.hook:' || dedup, 0));
    if exists (select from sms.outbox as o where o.dedup_key = dedup) then
        return '{}'::jsonb;
    end if;
    perform sms.enforce_send_limits(v_phone, 'auth', true, null, v_ip_key);

    if s.test_codes ? v_phone then
        -- A number the operator marked as never to be texted (see GOTRUE_SMS_TEST_OTP).
        insert into sms.outbox (source, phone, purpose, client_ip, ip_key, requester, status, expires_at, dedup_key,
                                provider_code, sent_at, gotrue_shape)
        values ('pg_hook', v_phone, e.purpose, e.client_ip, v_ip_key, 'auth', 'sent',
                now() + make_interval(secs => s.code_ttl_seconds), dedup, 'TEST_NUMBER', now(), e.shape);
    else
        insert into sms.outbox (source, phone, purpose, client_ip, ip_key, requester, code, expires_at, dedup_key,
                                gotrue_shape)
        values ('pg_hook', v_phone, e.purpose, e.client_ip, v_ip_key, 'auth', e.otp,
                now() + make_interval(secs => s.code_ttl_seconds), dedup, e.shape);
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

------------------------------------------------------------------------------------------------
-- Retention
------------------------------------------------------------------------------------------------

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

    -- A key row only serialises requests; one untouched for a day guards nothing the limits count.
    delete from sms.limit_locks as l where l.touched_at < now() - interval '1 day';

    return jsonb_build_object('codes', codes_deleted, 'messages', messages_deleted);
end
$$;

-- Rows written before this migration: what the new limits count them as.
update sms.outbox as o
set requester = case
        when o.source in ('auth_hook', 'pg_hook') then 'auth'
        when o.source = 'grpc' then 'grpc'
        when o.user_id is not null then 'user:' || o.user_id::text
        else 'service'
    end,
    ip_key = sms.ip_key(o.client_ip)
where o.requester is null and o.created_at > now() - interval '24 hours';

-- Before this release a provider's connection error could quote the request URL (number and code)
-- into these columns, which phone_code_status returns to the requester: keep only the error code.
update sms.outbox as o
set last_error = coalesce(o.provider_code, 'provider error')
where o.last_error ~* '(PhoneNumbers|TemplateParam|https?://[^ ]*\?)';
update sms.deliveries as d
set provider_message = coalesce(d.provider_code, 'provider error')
where d.provider_message ~* '(PhoneNumbers|TemplateParam|https?://[^ ]*\?)';

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261204000001'::text $$;

------------------------------------------------------------------------------------------------
-- Every function of ours pins search_path = pg_catalog, pg_temp: the earlier files say so now, but
-- databases migrated before they did still hold their functions with search_path = ''.
------------------------------------------------------------------------------------------------

do $$
declare
    f regprocedure;
begin
    for f in
        select p.oid::regprocedure
        from pg_catalog.pg_proc as p
        join pg_catalog.pg_namespace as n on n.oid = p.pronamespace
        where n.nspname = 'sms'
           or (n.nspname = 'public' and p.proname in ('request_phone_code', 'verify_phone_code', 'phone_code_status'))
    loop
        execute pg_catalog.format('alter function %s set search_path = pg_catalog, pg_temp', f);
    end loop;
end
$$;

------------------------------------------------------------------------------------------------
-- Privileges: each role what its process calls
------------------------------------------------------------------------------------------------

revoke all on function
    sms.ip_key(inet), sms.client_address(), sms.client_ip(), sms.caller_owner(), sms.caller_is_anonymous_user(),
    sms.owns_phone(uuid, text), sms.window_frees_at(timestamptz[], integer, interval),
    sms.enforce_send_limits(text, text, boolean, uuid, text),
    sms.issue_code(text, text, text, uuid, boolean, text, text, text, text), sms.check_code(text, text, text, text)
from public, anon, authenticated, service_role;

do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'sms_grpc') then
        create role sms_grpc nologin noinherit;
    end if;
end
$$;
comment on role sms_grpc is 'supabase-aliyun-sms: the gRPC drop-in (sms-sidecar grpc, or GRPC_PORT in serve), which sets this role on its connections. Grant it to the login that runs gRPC: grant sms_grpc to sms_sidecar;';
grant sms_grpc to postgres;
grant usage on schema sms to sms_grpc;

-- The gRPC functions and retention are nobody's by default but their process's.
revoke execute on function sms.grpc_send_code(text, text, text), sms.grpc_verify_code(text, text), sms.purge(interval)
    from sms_sidecar;
grant execute on function
    sms.grpc_send_code(text, text, text), sms.grpc_verify_code(text, text), sms.message_state(uuid), sms.schema_version()
to sms_grpc;

-- Installations already serving gRPC keep working: their sidecar login gets the role it now needs.
do $$
begin
    if exists (select from sms.outbox as o where o.source = 'grpc') then
        grant sms_grpc to sms_sidecar;
    end if;
end
$$;

notify pgrst, 'reload schema';
