-- supabase-aliyun-sms: a cheaper hook path in PostgreSQL.
--
-- Measured with the sidecar under a sign-up burst (bench/hook.py; profile with `perf record -e
-- cpu-clock` on the backends), PostgreSQL spent two to three times the functions' own time per hook
-- request. Three causes, three changes:
-- 1. every request was a statement and a commit of its own, with as many backends contending for
--    the same index pages and WAL as the pool had connections: the sidecar now hands over the events
--    that arrive while one such statement runs as the next one (sms.hook_begin_many), and each
--    request still waits for the commit of its own lease before it sends;
-- 2. sms.window_frees_at was a SQL function that cannot be inlined (it pins search_path), so it was
--    parsed and planned on every call, several times per request: it is PL/pgSQL now, whose plans
--    are kept for the session;
-- 3. the hook's statements were re-planned for their parameters on every call: the two entry points
--    now use generic plans (the same plan whatever the phone), and an accepted delivery no longer
--    reads its message before updating it.

create or replace function sms.hook_begin_many(p_requests jsonb, p_worker text, p_lease_seconds integer default 10)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
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
            answer := sms.hook_begin(r -> 'event', r ->> 'body_sha256', p_worker, p_lease_seconds);
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
comment on function sms.hook_begin_many(jsonb, text, integer) is 'supabase-aliyun-sms: sms.hook_begin for each element of a JSON array ({event, body_sha256}), in order, in one statement; returns the array of their answers, a refusal (what sms.raise_api_error raised) as {"action": "refused", "error": <body>, "meta": <status and headers>}.';

revoke all on function sms.hook_begin_many(jsonb, text, integer) from public, anon, authenticated, service_role;
grant execute on function sms.hook_begin_many(jsonb, text, integer) to sms_sidecar;
-- The sidecar begins through sms.hook_begin_many only.
revoke execute on function sms.hook_begin(jsonb, text, text, integer) from sms_sidecar;

create or replace function sms.window_frees_at(p_sends timestamptz[], p_limit integer, p_window interval)
returns timestamptz
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    frees timestamptz;
begin
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
comment on function sms.window_frees_at(timestamptz[], integer, interval) is 'supabase-aliyun-sms: when an N-per-window limit (NULL: none) next allows a send, given the send times; NULL when it allows one now.';

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

    if p_outcome = 'accepted' then
        -- Recorded even if the lease was lost meanwhile: the provider did accept it.
        update sms.outbox as o
        set status = 'sent', code = null, sent_at = now(), lease_until = null, biz_id = p_biz_id,
            provider_code = p_provider_code, last_error = null
        where o.id = mid;
        return 'sent';
    end if;

    select o.attempts into tries from sms.outbox as o where o.id = mid for update;
    if p_outcome = 'rejected' or (p_outcome in ('retry', 'ambiguous') and tries >= p_max_attempts) then
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

-- The same plan whatever the phone or result: re-planning for each call's parameters cost more
-- than any plan it found.
alter function sms.hook_begin_many(jsonb, text, integer) set plan_cache_mode = force_generic_plan;
alter function sms.finish_deliveries(jsonb) set plan_cache_mode = force_generic_plan;

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261204000004'::text $$;
