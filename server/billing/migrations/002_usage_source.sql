-- Which usage stream entry inserted each usage row (docs/billing.md, Flusher). The flusher
-- REFUNDs the cache for a replayed entry whose event Postgres already had only when the row came
-- from ANOTHER entry (the original, before Redis lost its data): if the row came from this very
-- entry (committed, then a crash or a claim by another consumer before XACK), the cache was
-- charged once and Postgres once, and a refund would over-credit the tenant.
-- Written by the flusher as '<stream entry id> ts=<ts> replay=<0|1>'; NULL for rows written
-- before this migration (or by a caller that does not know the entry). A nullable column with no
-- default: adding it rewrites nothing and takes only a brief lock.
ALTER TABLE usage_events
    ADD COLUMN source text NULL CHECK (source <> '');
