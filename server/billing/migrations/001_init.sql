-- Billing schema (docs/billing.md). Money is BIGINT micro-units everywhere; no numeric/float.
-- Applied by server/billing/migrate.py inside one transaction, recorded in schema_migrations.

-- Tenant ids end up inside Redis hash tags (`sg:{t}:...`), so braces and whitespace are refused
-- here rather than discovered as a cross-slot error in a Lua script.
CREATE TABLE tenants (
    tenant_id                text PRIMARY KEY
        CHECK (tenant_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    name                     text NOT NULL,
    overdraft_micros         bigint NOT NULL DEFAULT 0 CHECK (overdraft_micros >= 0),
    max_concurrent_sessions  integer NOT NULL DEFAULT 100 CHECK (max_concurrent_sessions >= 0),
    audio_seconds_per_minute integer NOT NULL DEFAULT 6000 CHECK (audio_seconds_per_minute >= 0),
    requests_per_second      integer NOT NULL DEFAULT 50 CHECK (requests_per_second >= 0),
    burst                    integer NOT NULL DEFAULT 100 CHECK (burst >= 0),
    created_at               timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a key is stored; `prefix` (first 8 chars) is for display and support.
CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES tenants (tenant_id),
    prefix     text NOT NULL CHECK (char_length(prefix) <= 8),
    key_sha256 text NOT NULL UNIQUE CHECK (key_sha256 ~ '^[0-9a-f]{64}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz NULL
);
-- Lookup by sha256 uses the UNIQUE index above; listing a tenant's keys uses this one.
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

CREATE TABLE price_plans (
    model            text NOT NULL CHECK (model <> ''),
    unit             text NOT NULL CHECK (unit IN ('audio_ms', 'characters', 'pages', 'tokens')),
    micros_per_block bigint NOT NULL CHECK (micros_per_block >= 0),
    block_units      bigint NOT NULL CHECK (block_units > 0),
    PRIMARY KEY (model, unit)
);

-- No CHECK on the sign of the balance: usage beyond a lease (and the overdraft) is still
-- charged, so a balance may legitimately go negative.
CREATE TABLE wallets (
    tenant_id      text PRIMARY KEY REFERENCES tenants (tenant_id),
    balance_micros bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Append-only (enforced by the trigger below). Top-ups credit (> 0); usage debits (<= 0: a
-- report whose cumulative cost did not cross a micro has a zero delta but is still an event).
CREATE TABLE ledger_entries (
    entry_id      bigserial PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants (tenant_id),
    kind          text NOT NULL CHECK (kind IN ('topup', 'usage')),
    amount_micros bigint NOT NULL,
    ref           text NOT NULL CHECK (ref <> ''),
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, kind, ref),
    CHECK ((kind = 'topup' AND amount_micros > 0) OR (kind = 'usage' AND amount_micros <= 0))
);
-- "Ledger by tenant" in entry order (the UNIQUE index above is ordered by kind, ref).
CREATE INDEX ledger_entries_tenant_idx ON ledger_entries (tenant_id, entry_id);

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only (% refused)', TG_OP;
END
$$;
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

-- units / cost_micros are deltas of cumulative values, hence >= 0 (0 is a legal delta).
CREATE TABLE usage_events (
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    event_id    text NOT NULL CHECK (event_id <> ''),
    session_id  text NOT NULL,
    model       text NOT NULL,
    unit        text NOT NULL CHECK (unit IN ('audio_ms', 'characters', 'pages', 'tokens')),
    units       bigint NOT NULL CHECK (units >= 0),
    cost_micros bigint NOT NULL CHECK (cost_micros >= 0),
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);
-- Usage by tenant / UTC day / model: the expression must match store.usage_summary exactly.
-- timezone('UTC', timestamptz) is IMMUTABLE, so it may be indexed.
CREATE INDEX usage_events_tenant_day_model_idx
    ON usage_events (tenant_id, ((occurred_at AT TIME ZONE 'UTC')::date), model, unit)
    INCLUDE (units, cost_micros);

CREATE TABLE topups (
    topup_id        bigserial PRIMARY KEY,
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    idempotency_key text NOT NULL CHECK (idempotency_key <> ''),
    amount_micros   bigint NOT NULL CHECK (amount_micros > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
-- seed_snapshot reads a tenant's top-ups of the last 48 h.
CREATE INDEX topups_tenant_created_idx ON topups (tenant_id, created_at);
