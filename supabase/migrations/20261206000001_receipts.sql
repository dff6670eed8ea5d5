-- supabase-aliyun-sms 7: delivery receipts, the carrier's verdict on each SMS Aliyun accepted.
--
-- Aliyun's SmsReport "HTTP batch push" (or, where the sidecar cannot be reached, its answers to
-- QuerySendDetails) says whether the carrier delivered an SMS. The sidecar hands each push to
-- sms.record_receipts in one statement; the verdict lands on the attempt's ledger row (its id was
-- the send's OutId), and public.phone_code_status shows it as `delivered`.

------------------------------------------------------------------------------------------------
-- The ledger keeps the receipt
------------------------------------------------------------------------------------------------

alter table sms.deliveries
    add column if not exists delivered boolean,
    add column if not exists carrier_code text,
    add column if not exists carrier_message text,
    add column if not exists reported_at timestamptz,
    add column if not exists receipt_latency_ms integer,
    add column if not exists receipt_source text check (receipt_source in ('push', 'query')),
    add column if not exists receipt_polls integer not null default 0,
    add column if not exists receipt_polled_at timestamptz;

comment on column sms.deliveries.delivered is 'The carrier''s verdict from Aliyun''s delivery receipt: true delivered, false not delivered, null no receipt yet.';
comment on column sms.deliveries.carrier_code is 'The receipt''s err_code: DELIVERED on success, else the carrier''s code (e.g. MK:0001).';
comment on column sms.deliveries.carrier_message is 'The receipt''s err_msg, cut short, with anything that looks like a phone number removed.';
comment on column sms.deliveries.reported_at is 'When the carrier reported (the receipt''s report_time); an older receipt never replaces a newer one.';
comment on column sms.deliveries.receipt_latency_ms is 'From Aliyun sending the SMS to the carrier''s report (send_time to report_time, both Aliyun''s clock).';
comment on column sms.deliveries.receipt_source is 'Where the receipt came from: push (SmsReport HTTP batch push) or query (QuerySendDetails polling).';
comment on column sms.deliveries.receipt_polls is 'How often the sidecar asked QuerySendDetails about this attempt (SMS_WORKER_RECEIPT_POLL_AFTER_SECONDS).';
comment on column sms.deliveries.receipt_polled_at is 'When the sidecar last asked QuerySendDetails about this attempt.';

------------------------------------------------------------------------------------------------
-- Receipts in
------------------------------------------------------------------------------------------------

create or replace function sms._carrier_text(p_text text, p_max integer)
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$
    -- Control characters out, then any run of five or more digits (spaces, dashes and a + between
    -- them too): a carrier may quote the number it could not reach.
    select nullif(pg_catalog.left(pg_catalog.btrim(pg_catalog.regexp_replace(
        pg_catalog.regexp_replace(coalesce(p_text, ''), '[[:cntrl:]]+', ' ', 'g'),
        '\+?[0-9](?:[ -]?[0-9]){4,}', '#', 'g')), p_max), '')
$$;
comment on function sms._carrier_text(text, integer) is 'supabase-aliyun-sms: a carrier''s code or message as the ledger may keep it: no control characters, no run of five or more digits (a phone number), at most p_max characters.';

create or replace function sms.record_receipts(p_receipts jsonb, p_source text default 'push')
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    answer jsonb;
begin
    if jsonb_typeof(p_receipts) is distinct from 'array' then
        raise exception 'sms.record_receipts takes a JSON array of receipts' using errcode = '22023';
    end if;
    if p_source is null or p_source not in ('push', 'query') then
        raise exception 'unknown receipt source %', p_source using errcode = '22023';
    end if;

    with incoming as (
        select r.*, case when r.out_id ~ '^[1-9][0-9]{0,17}$' then r.out_id::bigint end as delivery_id
        from jsonb_to_recordset(p_receipts) as r(out_id text, biz_id text, phone text, success boolean, code text,
                                                 message text, report_time timestamptz, send_time timestamptz)
    ),
    -- Ours only when Aliyun's BizId is the one it gave us; an attempt whose answer never came back
    -- (ambiguous) has none, and then the number must be the one we sent to. An OutId of another
    -- application on the same Aliyun account matches nothing.
    candidates as (
        select i.* from incoming as i
        join sms.deliveries as d on d.id = i.delivery_id
        join sms.outbox as o on o.id = d.message_id
        where i.success is not null and i.report_time is not null
          and case when d.biz_id is not null then d.biz_id = i.biz_id
                   else o.phone in (i.phone, '86' || i.phone) end
    ),
    -- One receipt per attempt, the newest report: a push may repeat or reorder them.
    latest as (
        select distinct on (c.delivery_id) c.*
        from candidates as c
        order by c.delivery_id, c.report_time desc, c.success desc
    ),
    -- Locked in id order, so two pushes of overlapping receipts wait for each other, never deadlock;
    -- only rows the receipt changes (the check is made again on a row that was waited for), so a
    -- repeated push locks and writes nothing.
    ours as (
        select d.id, l.biz_id, l.success, l.code, l.message, l.report_time, l.send_time
        from sms.deliveries as d
        join latest as l on l.delivery_id = d.id
        where d.reported_at is null or d.reported_at < l.report_time
        order by d.id
        for update of d
    ),
    written as (
        update sms.deliveries as d
        set delivered = i.success,
            carrier_code = sms._carrier_text(i.code, 32),
            carrier_message = sms._carrier_text(i.message, 120),
            reported_at = i.report_time,
            receipt_latency_ms = greatest(0, least(2147483647, (extract(epoch from
                i.report_time - coalesce(i.send_time, d.finished_at, d.started_at)) * 1000)::bigint))::integer,
            receipt_source = p_source,
            biz_id = coalesce(d.biz_id, i.biz_id)
        from ours as i
        where d.id = i.id and (d.reported_at is null or d.reported_at < i.report_time)
        returning d.delivered, d.carrier_code, d.receipt_latency_ms
    )
    select jsonb_build_object(
        'received', (select count(*) from incoming),
        'unknown', (select count(*) from incoming as i
                    where i.delivery_id is null or i.delivery_id not in (select c.delivery_id from candidates as c)),
        'stored', (select coalesce(jsonb_agg(jsonb_build_object('delivered', w.delivered, 'code', w.carrier_code,
                                                                'latency_ms', w.receipt_latency_ms)), '[]')
                   from written as w)
    )
    into answer;
    return answer;
end
$$;
comment on function sms.record_receipts(jsonb, text) is 'supabase-aliyun-sms: stores delivery receipts ({out_id, biz_id, phone, success, code, message, report_time, send_time}, as the sidecar normalises Aliyun''s) on their ledger rows, in one statement. Idempotent: a repeat, or a receipt older than the one stored, changes nothing. Returns {received, unknown (not ours), stored: [{delivered, code, latency_ms}] (the rows it changed)}.';
grant execute on function sms.record_receipts(jsonb, text) to sms_sidecar;

------------------------------------------------------------------------------------------------
-- Polling, for deployments Aliyun cannot push to
------------------------------------------------------------------------------------------------

create or replace function sms.receipts_due(p_after_seconds integer, p_limit integer, p_max_polls integer default 3)
returns table (delivery_id bigint, phone text, biz_id text, sent_at timestamptz)
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    -- Accepted attempts with no receipt after p_after_seconds, asked about again every p_after_seconds
    -- up to p_max_polls times; skip locked and marked, so replicas ask about each once. The window is
    -- what the outbox's created_at index reaches cheaply: a send still silent after it has lost its
    -- receipt.
    return query
    with due as (
        select d.id
        from sms.outbox as o
        join sms.deliveries as d on d.message_id = o.id
        where o.created_at > now() - make_interval(secs => p_after_seconds * (p_max_polls + 1) + 600)
          and o.created_at < now() - make_interval(secs => p_after_seconds)
          and o.status = 'sent'
          and d.outcome = 'accepted' and d.delivered is null and d.biz_id is not null
          and d.receipt_polls < p_max_polls
          and (d.receipt_polled_at is null
               or d.receipt_polled_at < now() - make_interval(secs => p_after_seconds))
        order by o.created_at
        limit p_limit
        for update of d skip locked
    )
    update sms.deliveries as d
    set receipt_polls = d.receipt_polls + 1, receipt_polled_at = now()
    from due, sms.outbox as o
    where d.id = due.id and o.id = d.message_id
    returning d.id, o.phone, d.biz_id, d.finished_at;
end
$$;
comment on function sms.receipts_due(integer, integer, integer) is 'supabase-aliyun-sms: up to p_limit accepted attempts still without a receipt p_after_seconds after sending, for the sidecar to ask QuerySendDetails about (at most p_max_polls times each, p_after_seconds apart); marks them asked.';
grant execute on function sms.receipts_due(integer, integer, integer) to sms_sidecar;

------------------------------------------------------------------------------------------------
-- What the receipts say
------------------------------------------------------------------------------------------------

create or replace function sms._message_receipt(p_message_id uuid)
returns table (delivered boolean, carrier_code text, carrier_message text, reported_at timestamptz,
               receipt_latency_ms integer)
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    -- A message may have had several attempts: delivered if any was, else the newest failure.
    select d.delivered, d.carrier_code, d.carrier_message, d.reported_at, d.receipt_latency_ms
    from sms.deliveries as d
    where d.message_id = p_message_id and d.delivered is not null
    order by d.delivered desc, d.reported_at desc
    limit 1
$$;
comment on function sms._message_receipt(uuid) is 'supabase-aliyun-sms: the carrier''s verdict on a message: the receipt of an attempt that was delivered, else the newest failure receipt, else no row.';

create or replace function sms.receipt_stats(p_from_seconds integer default 2400, p_to_seconds integer default 600)
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    stats jsonb;
begin
    -- Per message, as sms._message_receipt reads it: delivered if any attempt was (the fastest such
    -- receipt), undelivered if every receipt says so, else no verdict yet.
    select jsonb_build_object(
        'sent', count(*),
        'undelivered', count(*) filter (where m.delivered = false),
        'delivered_within', jsonb_build_object(
            '1', count(*) filter (where m.delivered and m.latency_ms <= 60000),
            '5', count(*) filter (where m.delivered and m.latency_ms <= 300000),
            '10', count(*) filter (where m.delivered and m.latency_ms <= 600000))
    )
    into stats
    from (
        select bool_or(d.delivered) as delivered, min(d.receipt_latency_ms) filter (where d.delivered) as latency_ms
        from sms.outbox as o
        join sms.deliveries as d on d.message_id = o.id
        where o.created_at > now() - make_interval(secs => p_from_seconds)
          and o.created_at <= now() - make_interval(secs => p_to_seconds)
          and o.status = 'sent'
        group by o.id
    ) as m;
    return stats;
end
$$;
comment on function sms.receipt_stats(integer, integer) is 'supabase-aliyun-sms: of the SMS accepted between p_from_seconds and p_to_seconds ago, how many the carrier delivered within 1, 5 and 10 minutes and how many it did not, for the sidecar''s metrics.';
grant execute on function sms.receipt_stats(integer, integer) to sms_sidecar;

------------------------------------------------------------------------------------------------
-- Status, for the caller and the operator
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
    message_id uuid;
    found_status text;
    found_error text;
    receipt record;
begin
    perform sms._check_caller_allowed(sms._current_settings());
    select c.owner, o.id, o.status, o.last_error into code_owner, message_id, found_status, found_error
    from sms.codes as c
    join sms.outbox as o on o.code_id = c.id
    where c.id = p_request_id;
    if not found or (code_owner is distinct from sms._caller_owner() and sms._caller_role() <> 'service_role') then
        perform sms._raise_api_error(404, 'request_not_found', 'No such code request for this caller.');
    end if;
    select r.delivered, r.carrier_code, r.carrier_message into receipt from sms._message_receipt(message_id) as r;
    return jsonb_build_object(
        'status', found_status,
        'error', case
            when found_status = 'failed' then found_error
            when receipt.delivered = false then
                'not delivered by the carrier: ' || coalesce(receipt.carrier_code, 'no code')
                || coalesce(' (' || receipt.carrier_message || ')', '')
        end,
        'delivered', receipt.delivered
    );
end
$$;
comment on function sms.code_status(uuid) is 'supabase-aliyun-sms: delivery status of the caller''s own code request (any request for service_role), with the carrier''s verdict (delivered) once a receipt arrives. Behind public.phone_code_status.';

comment on function public.phone_code_status(uuid) is 'supabase-aliyun-sms: {status: queued|sending|sent|failed, error, delivered: true|false|null} of the caller''s own code request; delivered is the carrier''s verdict from Aliyun''s delivery receipt.';

-- The columns the view had stay first and in order (create or replace view may only add at the end).
create or replace view sms.delivery_log
with (security_invoker = true)
as
select
    o.created_at,
    o.source,
    o.purpose,
    case
        when pg_catalog.length(p.digits) < 8 then pg_catalog.repeat('*', pg_catalog.length(p.digits))
        else '+' || pg_catalog.left(p.digits, p.cc_len)
            || pg_catalog.repeat('*', pg_catalog.length(p.digits) - p.cc_len - 4)
            || pg_catalog.right(p.digits, 4)
    end as phone_masked,
    o.user_id,
    o.status,
    o.attempts,
    o.provider_code,
    o.last_error,
    o.biz_id,
    o.sent_at,
    d.id as out_id,
    d.outcome as last_outcome,
    d.provider_code as last_provider_code,
    d.latency_ms as last_latency_ms,
    d.finished_at as last_finished_at,
    o.id as message_id,
    r.delivered,
    r.carrier_code,
    r.carrier_message,
    r.reported_at,
    r.receipt_latency_ms
from sms.outbox as o
cross join lateral (
    select
        x.digits,
        case
            when pg_catalog.left(x.digits, 1) in ('1', '7') then 1
            when pg_catalog.left(x.digits, 2) in (
                '20', '27', '30', '31', '32', '33', '34', '36', '39', '40', '41', '43', '44', '45', '46', '47',
                '48', '49', '51', '52', '53', '54', '55', '56', '57', '58', '60', '61', '62', '63', '64', '65',
                '66', '81', '82', '84', '86', '90', '91', '92', '93', '94', '95', '98'
            ) then 2
            else 3
        end as cc_len
    from (select pg_catalog.regexp_replace(o.phone, '[^0-9]', '', 'g') as digits) as x
) as p
left join lateral (
    select dd.id, dd.outcome, dd.provider_code, dd.latency_ms, dd.finished_at
    from sms.deliveries as dd
    where dd.message_id = o.id
    order by dd.attempt desc, dd.id desc
    limit 1
) as d on true
left join lateral sms._message_receipt(o.id) as r on true;

comment on view sms.delivery_log is 'supabase-aliyun-sms: one row per SMS requested, with its latest send attempt and the carrier''s verdict (delivered, carrier_code, carrier_message, reported_at, receipt_latency_ms; null until a receipt arrives); phone numbers masked, codes never shown. out_id is the OutId sent to Aliyun (QuerySendDetails results and receipts carry it). For operators (postgres) only: select * from sms.delivery_log order by created_at desc limit 50;';

------------------------------------------------------------------------------------------------
-- The sidecar records results through sms.finish_deliveries only
------------------------------------------------------------------------------------------------

revoke execute on function sms.finish_delivery(bigint, text, text, text, text, text, text, integer, integer, integer)
    from sms_sidecar;

------------------------------------------------------------------------------------------------
-- Version
------------------------------------------------------------------------------------------------

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261206000001'::text $$;

revoke execute on all functions in schema sms from public;

notify pgrst, 'reload schema';
