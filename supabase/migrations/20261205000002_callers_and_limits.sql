-- supabase-aliyun-sms 2/6: who is calling, from where, for which number, and whether one more SMS
-- is allowed. Internal helpers only: nobody is granted any of them.
--
-- * Every send is counted against its requester, and sends by anyone who does not own the number
--   share a small budget per phone, so others can neither lock the owner out nor bomb the number.
-- * Limits serialise on rows of sms.limit_locks instead of advisory locks: under REPEATABLE READ or
--   SERIALIZABLE a concurrent send fails the request with a retryable error instead of going
--   unseen by this transaction's snapshot.
-- * Client addresses are counted per host (IPv4, IPv4-mapped IPv6 as IPv4, IPv6 per /64), and an
--   address header that is not an address counts in one shared bucket instead of switching the
--   per-IP limit off.

------------------------------------------------------------------------------------------------
-- Policy and errors
------------------------------------------------------------------------------------------------

-- _current_settings: the policy row, or a clear error.
create or replace function sms._current_settings()
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
comment on function sms._current_settings() is 'supabase-aliyun-sms: the policy row; fails clearly if it was deleted.';

-- _raise_api_error: the one way every function here refuses a request.
create or replace function sms._raise_api_error(
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
comment on function sms._raise_api_error(integer, text, text, jsonb, integer) is 'supabase-aliyun-sms: raise an error PostgREST answers with the given HTTP status, JSON body and Retry-After.';

------------------------------------------------------------------------------------------------
-- Callers
------------------------------------------------------------------------------------------------

create or replace function sms._request_claims()
returns jsonb
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}'::jsonb);
end
$$;
comment on function sms._request_claims() is 'supabase-aliyun-sms: the JWT claims PostgREST set for this request, or {}.';

create or replace function sms._caller_uid()
returns uuid
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    sub text := sms._request_claims() ->> 'sub';
begin
    if sub ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
        return sub::uuid;
    end if;
    return null;
end
$$;
comment on function sms._caller_uid() is 'supabase-aliyun-sms: the signed-in user (JWT sub), or NULL. Reads the claims directly so it works before GoTrue has replaced auth.uid().';

create or replace function sms._caller_role()
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce(sms._request_claims() ->> 'role', '');
end
$$;
comment on function sms._caller_role() is 'supabase-aliyun-sms: the JWT role of the request (anon, authenticated, service_role), or empty.';

create or replace function sms._caller_is_anonymous_user()
returns boolean
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce((sms._request_claims() ->> 'is_anonymous')::boolean, false);
exception
    when invalid_text_representation then
        return true;  -- unreadable: treat it as the more restricted kind
end
$$;
comment on function sms._caller_is_anonymous_user() is 'supabase-aliyun-sms: whether the JWT is a Supabase anonymous sign-in (is_anonymous).';

create or replace function sms._check_caller_allowed(s sms.settings)
returns void
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    -- Privileges already keep anon out; this also covers a role granted by hand.
    if not s.allow_anon and sms._caller_uid() is null and sms._caller_role() not in ('service_role', '') then
        perform sms._raise_api_error(401, 'anon_not_allowed', 'Sign in before requesting or verifying a phone code.');
    end if;
end
$$;
comment on function sms._check_caller_allowed(sms.settings) is 'supabase-aliyun-sms: refuses anonymous API callers unless sms.settings.allow_anon is on.';

------------------------------------------------------------------------------------------------
-- Addresses
------------------------------------------------------------------------------------------------

create or replace function sms._ip_key(p_ip pg_catalog.inet)
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
comment on function sms._ip_key(inet) is 'supabase-aliyun-sms: the key the per-IP limit counts an address under: the IPv4 host without netmask (also for ::ffff:a.b.c.d), or the IPv6 /64.';

create or replace function sms._client_address()
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
    return sms._ip_key(parsed);
end
$$;
comment on function sms._client_address() is 'supabase-aliyun-sms: the per-IP limit key of a PostgREST request (X-Real-IP, else the last X-Forwarded-For entry): see sms._ip_key; invalid when the header is not an address (one shared bucket, so garbage cannot switch the limit off); NULL without either header.';

create or replace function sms._caller_owner()
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    uid uuid := sms._caller_uid();
begin
    if sms._caller_role() in ('service_role', '') then
        return 'service';
    end if;
    if uid is not null then
        return 'user:' || uid::text;
    end if;
    -- Anonymous callers are told apart only by their address.
    return 'anon:' || coalesce(sms._client_address(), 'unknown');
end
$$;
comment on function sms._caller_owner() is 'supabase-aliyun-sms: the owner key of the calling request: service (service_role or no JWT), user:<uuid>, or anon:<address>.';

------------------------------------------------------------------------------------------------
-- Phone numbers and purposes
------------------------------------------------------------------------------------------------

create or replace function sms._normalize_phone(p_raw text)
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
comment on function sms._normalize_phone(text) is 'supabase-aliyun-sms: +8613012341234, 8613012341234, 008613012341234 or 13012341234 to E.164 digits without + (8613012341234); NULL when not a valid number.';

create or replace function sms._is_country_allowed(p_phone text, p_codes text[])
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
comment on function sms._is_country_allowed(text, text[]) is 'supabase-aliyun-sms: whether a normalised number belongs to one of the allowed country codes.';

create or replace function sms._parse_phone(p_phone text, s sms.settings)
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    normalized text := sms._normalize_phone(p_phone);
begin
    if normalized is null then
        perform sms._raise_api_error(
            400, 'invalid_phone',
            'Invalid phone number. Use +86 followed by the 11-digit mobile number. 手机号码格式不正确。'
        );
    end if;
    if not sms._is_country_allowed(normalized, s.allowed_country_codes) then
        perform sms._raise_api_error(
            400, 'phone_not_allowed',
            'Phone numbers from this country or region are not supported. 不支持该国家或地区的手机号码。'
        );
    end if;
    return normalized;
end
$$;
comment on function sms._parse_phone(text, sms.settings) is 'supabase-aliyun-sms: normalises a phone number or raises HTTP 400 (invalid, or country not allowed).';

create or replace function sms._owns_phone(p_user_id uuid, p_phone text)
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
comment on function sms._owns_phone(uuid, text) is 'supabase-aliyun-sms: whether the number is the user''s own confirmed-or-not Auth phone (auth.users.phone, E.164 digits).';

create or replace function sms._check_purpose(p_purpose text)
returns void
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if not coalesce(p_purpose ~ '^[a-z0-9][a-z0-9_.-]{0,31}$', false) then
        perform sms._raise_api_error(
            400, 'invalid_purpose',
            'purpose must be 1-32 characters of a-z, 0-9, _, . or -, starting with a letter or digit.'
        );
    end if;
end
$$;
comment on function sms._check_purpose(text) is 'supabase-aliyun-sms: raises HTTP 400 for a malformed purpose (purposes are short lowercase identifiers such as default, bind_phone or mfa).';

------------------------------------------------------------------------------------------------
-- Limits
------------------------------------------------------------------------------------------------

-- _window_frees_at: PL/pgSQL, whose plans are kept for the session; a SQL function that pins
-- search_path cannot be inlined and was parsed and planned on every call, several times a request.
create or replace function sms._window_frees_at(p_sends timestamptz[], p_limit integer, p_window interval)
returns timestamptz
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    frees timestamptz;
begin
    -- For an N-per-window limit, the N-th most recent send in the window decides when a slot frees;
    -- a limit of 0 allows nothing for a whole window.
    if p_limit is null then
        return null;
    elsif p_limit = 0 then
        return now() + p_window;
    end if;
    select s.t + p_window into frees from unnest(p_sends) as s (t)
    where s.t > now() - p_window order by s.t desc offset p_limit - 1 limit 1;
    return frees;
end
$$;
comment on function sms._window_frees_at(timestamptz[], integer, interval) is 'supabase-aliyun-sms: when an N-per-window limit (NULL: none) next allows a send, given the send times; NULL when it allows one now.';

create or replace function sms._enforce_send_limits(
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
    s sms.settings := sms._current_settings();
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
            perform sms._raise_api_error(
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
        (2, 'hourly_limit_per_phone', sms._window_frees_at(phone_sends, s.hourly_limit_per_phone, interval '1 hour')),
        (3, 'daily_limit_per_phone', sms._window_frees_at(phone_sends, s.daily_limit_per_phone, interval '24 hours')),
        (4, 'others_hourly_limit_per_phone', case when not p_by_owner then
            sms._window_frees_at(others_sends, s.others_hourly_limit_per_phone, interval '1 hour') end),
        (5, 'others_daily_limit_per_phone', case when not p_by_owner then
            sms._window_frees_at(others_sends, s.others_daily_limit_per_phone, interval '24 hours') end),
        (6, 'hourly_limit_per_user', case when p_user_id is not null and s.hourly_limit_per_user is not null then
            sms._window_frees_at(array(select o.created_at from sms.outbox as o
                                       where o.user_id = p_user_id and o.created_at > now() - interval '1 hour'
                                       order by o.created_at desc limit s.hourly_limit_per_user),
                                 s.hourly_limit_per_user, interval '1 hour') end),
        (7, 'hourly_limit_per_ip', case when p_ip_key is not null and s.hourly_limit_per_ip is not null then
            sms._window_frees_at(array(select o.created_at from sms.outbox as o
                                       where o.ip_key = p_ip_key and o.created_at > now() - interval '1 hour'
                                       order by o.created_at desc limit s.hourly_limit_per_ip),
                                 s.hourly_limit_per_ip, interval '1 hour') end)
    ) as l (ord, name, frees_at)
    where l.frees_at > now();

    if wait_until is not null then
        seconds := greatest(1, ceil(extract(epoch from wait_until - now())))::integer;
        perform sms._raise_api_error(
            429,
            'over_sms_send_rate_limit',
            format('Too many codes requested. Try again in %s seconds. 验证码发送过于频繁，请 %s 秒后再试。', seconds, seconds),
            jsonb_build_object('retry_after', seconds, 'limits', to_jsonb(hit)),
            seconds
        );
    end if;
end
$$;
comment on function sms._enforce_send_limits(text, text, boolean, uuid, text) is 'supabase-aliyun-sms: raises HTTP 429 (with Retry-After) when one more SMS to this phone, by this requester, for this user or from this address would break a limit in sms.settings; HTTP 503 (retry) when a concurrent request for the same keys committed after this transaction''s snapshot.';

-- New functions are PUBLIC's to execute until this (see 20261205000001_schema.sql); the grants stand
-- beside the functions.
revoke execute on all functions in schema sms from public;
