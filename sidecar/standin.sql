-- A minimal Supabase stand-in for vanilla PostgreSQL, used by `sms-sidecar dev` and the tests.
-- Run once as a superuser on an empty database. It mirrors what the migrations rely on in the
-- supabase/postgres image: the API roles, a demoted `postgres` owner, schemas `auth` and
-- `extensions`, GoTrue's `auth.uid()`/`auth.jwt()`, and (on purpose) the image's permissive
-- default privileges, so tests prove the migrations revoke what they must.

-- Roles are cluster-wide, so this part is written to run again for a second database.
do $$
begin
    if not exists (select from pg_roles where rolname = 'anon') then
        create role anon nologin noinherit;
        create role authenticated nologin noinherit;
        create role service_role nologin noinherit bypassrls;
        create role authenticator login noinherit;
        create role supabase_auth_admin login noinherit createrole;
        create role postgres login createdb createrole replication bypassrls;

        -- The image switched the API roles to inherit in 2023; match the current image.
        alter role anon inherit;
        alter role authenticated inherit;
        alter role service_role inherit;
        alter role anon set statement_timeout = '3s';
        alter role authenticated set statement_timeout = '8s';
        alter role authenticator set statement_timeout = '8s';
        alter role supabase_auth_admin set search_path = auth;
        alter role postgres set search_path = "$user", public, extensions;

        grant anon, authenticated, service_role to authenticator;
        grant anon, authenticated, service_role, supabase_auth_admin to postgres;
    end if;
end
$$;

do $$ begin execute format('grant all on database %I to postgres', current_database()); end $$;
alter schema public owner to postgres;
grant usage on schema public to anon, authenticated, service_role;

create schema extensions authorization postgres;
grant usage on schema extensions to anon, authenticated, service_role, postgres;
create extension pgcrypto with schema extensions;

create schema auth authorization supabase_auth_admin;
grant usage on schema auth to anon, authenticated, service_role, postgres;

create table auth.users (
    id uuid primary key,
    phone text unique,
    email text,
    created_at timestamptz not null default now()
);
alter table auth.users owner to supabase_auth_admin;

-- GoTrue's versions (migrations 20220224000811 and 20220531120530): legacy per-claim setting first,
-- then the JSON claims PostgREST sets today.
create function auth.uid() returns uuid
language sql stable
as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;

create function auth.role() returns text
language sql stable
as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
    )::text
$$;

create function auth.jwt() returns jsonb
language sql stable
as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
    )::jsonb
$$;

alter function auth.uid() owner to supabase_auth_admin;
alter function auth.role() owner to supabase_auth_admin;
alter function auth.jwt() owner to supabase_auth_admin;
grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role, postgres;

-- The image's initial schema: everything new in `public` is granted to the API roles.
alter default privileges for role postgres in schema public
    grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
    grant all on functions to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
    grant all on sequences to postgres, anon, authenticated, service_role;
