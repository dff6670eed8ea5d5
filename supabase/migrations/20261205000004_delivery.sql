-- supabase-aliyun-sms 4/6: delivery, the outbox the sidecar drains.
--
-- A message moves queued -> sending (leased to one worker, one open attempt in sms.deliveries)
-- -> sent or failed, or back to queued. Each move has one implementation: sms._lease_message
-- (queued or lease expired -> sending), sms._close_open_attempts (an attempt whose worker died is
-- ambiguous: it may have reached the provider), and sms.finish_delivery (an attempt's result moves
-- its message on; release_messages gives attempts back through it).

------------------------------------------------------------------------------------------------
-- Waking the sidecar
------------------------------------------------------------------------------------------------

create or replace function sms._notify_outbox()
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
comment on function sms._notify_outbox() is 'supabase-aliyun-sms: wakes LISTENing sidecars when a message is queued.';

drop trigger if exists outbox_notify on sms.outbox;
create trigger outbox_notify
    after insert on sms.outbox
    for each row
    when (new.status = 'queued')
    execute function sms._notify_outbox();

------------------------------------------------------------------------------------------------
-- Moves of a message: the implementations
------------------------------------------------------------------------------------------------

create or replace function sms._lease_message(p_message_id uuid, p_worker text, p_lease_seconds integer)
returns sms.outbox
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    m sms.outbox;
begin
    update sms.outbox as o
    set status = 'sending', attempts = o.attempts + 1, locked_by = p_worker,
        lease_until = now() + make_interval(secs => p_lease_seconds)
    where o.id = p_message_id
    returning o.* into m;
    return m;
end
$$;
comment on function sms._lease_message(uuid, text, integer) is 'supabase-aliyun-sms: leases a message to a worker for p_lease_seconds (status sending, one more attempt); the caller opens the attempt''s ledger row. Used by claim_messages and the Auth hook''s retry of a requeued message.';

create or replace function sms._close_open_attempts(p_message_ids uuid[])
returns void
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    update sms.deliveries as d
    set finished_at = clock_timestamp(), outcome = 'ambiguous',
        provider_message = 'lease expired before the attempt finished'
    where d.message_id = any (p_message_ids) and d.finished_at is null;
end
$$;
comment on function sms._close_open_attempts(uuid[]) is 'supabase-aliyun-sms: closes the attempts still open on these messages as ambiguous: their worker''s lease ran out (it crashed or hung), so they may have reached the provider. Their ids went to Aliyun as OutId, which the next worker looks up before sending again.';

------------------------------------------------------------------------------------------------
-- What the worker calls
------------------------------------------------------------------------------------------------

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
    expired_ids uuid[];
    m record;
    leased sms.outbox;
begin
    -- A code nobody can use any more is not worth a message.
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
    select array_agg(expired.id) into expired_ids from expired;
    perform sms._close_open_attempts(expired_ids);

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
        perform sms._close_open_attempts(array[m.id]);
        leased := sms._lease_message(m.id, p_worker, p_lease_seconds);
        message_id := leased.id;
        attempt := leased.attempts;
        source := leased.source;
        phone := leased.phone;
        purpose := leased.purpose;
        code := leased.code;
        created_at := leased.created_at;
        sign_name := coalesce(leased.sign_name, (select t.sign_name from sms.templates as t where t.purpose = leased.purpose));
        template_code := coalesce(leased.template_code,
                                  (select t.template_code from sms.templates as t where t.purpose = leased.purpose));

        insert into sms.deliveries (message_id, attempt, worker)
        values (m.id, attempt, p_worker)
        returning id into delivery_id;

        -- Their ids went to the provider as OutId: the worker looks them up before sending again.
        select coalesce(array_agg(d.id order by d.id), '{}') into ambiguous_delivery_ids
        from sms.deliveries as d where d.message_id = m.id and d.outcome = 'ambiguous';
        needs_reconcile := cardinality(ambiguous_delivery_ids) > 0;
        return next;
    end loop;
end
$$;
comment on function sms.claim_messages(text, integer, integer) is 'supabase-aliyun-sms: leases up to p_limit due messages to a worker (skip locked, so replicas share the queue) and opens a ledger row per attempt. A message whose lease expires becomes claimable again, flagged needs_reconcile.';
grant execute on function sms.claim_messages(text, integer, integer) to sms_sidecar;

-- finish_delivery: on the hook's path (through finish_deliveries), so its accepted branch, the
-- common one, updates the message without reading it first.
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
grant execute on function sms.finish_delivery(bigint, text, text, text, text, text, text, integer, integer, integer)
    to sms_sidecar;

-- finish_deliveries: under load many hook requests and worker sends finish at once; the sidecar
-- hands over the results that are waiting while one such statement runs as the next one, and
-- every request still waits for its own commit. The same plan whatever the result: re-planning
-- for each call's parameters cost more than any plan it found.
create or replace function sms.finish_deliveries(p_results jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    r jsonb;
    statuses jsonb := '[]';
begin
    if jsonb_typeof(p_results) is distinct from 'array' then
        raise exception 'sms.finish_deliveries takes a JSON array of results' using errcode = '22023';
    end if;
    for r in select value from jsonb_array_elements(p_results) loop
        statuses := statuses || to_jsonb(sms.finish_delivery(
            (r ->> 'delivery_id')::bigint,
            r ->> 'outcome',
            r ->> 'provider',
            r ->> 'provider_code',
            r ->> 'provider_message',
            r ->> 'biz_id',
            r ->> 'provider_request_id',
            (r ->> 'latency_ms')::integer,
            coalesce((r ->> 'retry_in_seconds')::integer, 30),
            coalesce((r ->> 'max_attempts')::integer, 5)
        ));
    end loop;
    return statuses;
end
$$;
comment on function sms.finish_deliveries(jsonb) is 'supabase-aliyun-sms: sms.finish_delivery for each element of a JSON array ({delivery_id, outcome, provider, provider_code, provider_message, biz_id, provider_request_id, latency_ms, retry_in_seconds, max_attempts}), in order, in one statement; returns the array of new message statuses. All or nothing: one bad element fails them all.';
grant execute on function sms.finish_deliveries(jsonb) to sms_sidecar;

create or replace function sms.release_messages(p_worker text)
returns integer
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    open_attempt bigint;
    released integer := 0;
begin
    -- A message this worker is sending has one open attempt; finishing it as released requeues the
    -- message without counting the attempt.
    for open_attempt in
        select d.id from sms.deliveries as d
        join sms.outbox as o on o.id = d.message_id
        where d.finished_at is null and o.status = 'sending' and o.locked_by = p_worker
        order by d.id
        for update of o
    loop
        perform sms.finish_delivery(open_attempt, 'released');
        released := released + 1;
    end loop;
    return released;
end
$$;
comment on function sms.release_messages(text) is 'supabase-aliyun-sms: on shutdown, hands a worker''s claimed but unsent messages back to the queue (sms.finish_delivery with outcome released).';
grant execute on function sms.release_messages(text) to sms_sidecar;

------------------------------------------------------------------------------------------------
-- What the sidecar reads
------------------------------------------------------------------------------------------------

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
grant execute on function sms.queue_stats() to sms_sidecar;

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
comment on function sms.message_state(uuid) is 'supabase-aliyun-sms: status of one outbox message, for a sidecar waiting on a duplicate hook event another request is still sending, and for the gRPC API waiting on its delivery.';
grant execute on function sms.message_state(uuid) to sms_sidecar, sms_grpc;

-- New functions are PUBLIC's to execute until this (see 20261205000001_schema.sql); the grants stand
-- beside the functions.
revoke execute on all functions in schema sms from public;
