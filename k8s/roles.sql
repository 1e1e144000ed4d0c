-- Two database roles instead of one (README, "Database roles"): the migration Job's, which owns
-- the schema's objects, and the service's, which may only read and write rows. Run it once per
-- database, as the database's owner (Neon: neondb_owner), before the first migration:
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f k8s/roles.sql
-- then give both roles a password (psql's \password sends it hashed, never in a log), and put
-- them in the Secret: MIGRATION_DATABASE_URL as playing_with_neon_migrator, DATABASE_URL (and
-- DATABASE_READ_URL) as playing_with_neon_service. Running it again changes nothing.
--
-- On PostgreSQL 14 and older every role may create tables in schema public; there, also run
-- (as the schema's owner) REVOKE CREATE ON SCHEMA public FROM PUBLIC, as 15 does by default.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'playing_with_neon_migrator') THEN
        CREATE ROLE playing_with_neon_migrator LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'playing_with_neon_service') THEN
        CREATE ROLE playing_with_neon_service LOGIN;
    END IF;
END
$$;

-- Without superuser rights (Neon's owner has CREATEROLE only), handing tables to the migrator
-- and setting its default privileges both need membership in it.
GRANT playing_with_neon_migrator TO CURRENT_USER;

GRANT USAGE, CREATE ON SCHEMA public TO playing_with_neon_migrator;
GRANT USAGE ON SCHEMA public TO playing_with_neon_service;

-- Alembic's bookkeeping, made here (as Alembic would) so that the service gets no right on it.
CREATE TABLE IF NOT EXISTS alembic_version (
    version_num varchar(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Tables made before these roles (earlier migrations as the owner, the notebook's own table)
-- become the migrator's, so later migrations may alter them.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['alembic_version', 'playing_with_neon', 'idempotency_keys'] LOOP
        IF to_regclass(name) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I OWNER TO playing_with_neon_migrator', name);
        END IF;
    END LOOP;
END
$$;

-- The service: rows only, on the tables there now and on every table a migration makes later.
-- (Identity columns need no right on their sequence; USAGE is for a later serial column.)
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO playing_with_neon_service;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO playing_with_neon_service;
REVOKE ALL ON alembic_version FROM playing_with_neon_service;
ALTER DEFAULT PRIVILEGES FOR ROLE playing_with_neon_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO playing_with_neon_service;
ALTER DEFAULT PRIVILEGES FOR ROLE playing_with_neon_migrator IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO playing_with_neon_service;
