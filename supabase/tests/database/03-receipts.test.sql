-- Delivery receipts on the ledger (sms.record_receipts) and in phone_code_status. Run with
-- `supabase test db` (or pytest). Everything is rolled back.
begin;
select plan(12);

update sms.settings set resend_cooldown_seconds = null, daily_limit_per_phone = null, hourly_limit_per_user = null;

-- A code, claimed and accepted by Aliyun with BizId 900^0, as the sidecar records it.
create temporary table t (request_id uuid, delivery_id bigint) on commit drop;
insert into t (request_id)
select (public.request_phone_code('+8613012349876', 'pgtap') ->> 'request_id')::uuid;
update t set delivery_id = (select c.delivery_id from sms.claim_messages('pgtap', 100, 60) as c
                            where c.phone = '8613012349876');
select sms.finish_deliveries(jsonb_build_array(jsonb_build_object(
    'delivery_id', (select delivery_id from t), 'outcome', 'accepted', 'provider', 'aliyun',
    'provider_code', 'OK', 'biz_id', '900^0')));

create function pg_temp.receipt(p_success boolean, p_report text, p_biz text default '900^0',
                                p_message text default '')
returns jsonb language sql as $$
    select jsonb_build_array(jsonb_build_object(
        'out_id', (select delivery_id from t)::text, 'biz_id', p_biz, 'phone', '13012349876',
        'success', p_success, 'code', case when p_success then 'DELIVERED' else 'MK:0001' end,
        'message', p_message, 'report_time', p_report, 'send_time', '2026-12-06T10:00:00+08:00'))
$$;

select is(sms.code_status((select request_id from t)) -> 'delivered', 'null'::jsonb, 'no verdict before a receipt');

select is(sms.record_receipts(pg_temp.receipt(true, '2026-12-06T10:00:07+08:00', '901^0')) ->> 'unknown', '1',
          'a receipt with another BizId is not ours');
select is(sms.record_receipts(pg_temp.receipt(false, '2026-12-06T10:00:05+08:00', p_message => 'to 13012349876'))
          -> 'stored' -> 0 ->> 'delivered', 'false', 'a failure receipt is stored');
select is((select carrier_message from sms.deliveries where id = (select delivery_id from t)), 'to #',
          'the carrier message keeps no number');
select is(sms.code_status((select request_id from t)) ->> 'error',
          'not delivered by the carrier: MK:0001 (to #)', 'the error is the carrier reason');

select is(jsonb_array_length(sms.record_receipts(pg_temp.receipt(true, '2026-12-06T10:00:03+08:00')) -> 'stored'), 0,
          'an older receipt changes nothing');
select is(jsonb_array_length(sms.record_receipts(pg_temp.receipt(true, '2026-12-06T10:00:09+08:00')) -> 'stored'), 1,
          'a newer receipt replaces it');
select is(sms.code_status((select request_id from t)) - 'status',
          '{"delivered": true, "error": null}'::jsonb, 'delivered, with no error');
select is((select receipt_latency_ms from sms.deliveries where id = (select delivery_id from t)), 9000,
          'send-to-receipt latency on Aliyun''s clock');
select is(jsonb_array_length(sms.record_receipts(pg_temp.receipt(true, '2026-12-06T10:00:09+08:00')) -> 'stored'), 0,
          'a repeat changes nothing');

select throws_ok($$ select sms.record_receipts('{}') $$, '22023', null, 'only an array of receipts');
select function_privs_are('sms', 'record_receipts', array['jsonb', 'text'], 'authenticated', array[]::text[]);

select * from finish();
rollback;
