-- Fewer indexes to maintain on every message insert (the hot write of the server).
-- Measured with 1:1 messages of ~1 KiB ciphertext in batches of 50 (WAL, synchronous=FULL):
-- 50 -> 36 us of SQLite CPU per message row (the same three indexes cost PostgreSQL too).
--
-- idx_messages_recipient: 1:1 history reads both directions through (sender, recipient, id)
-- (one range per direction), so the mirror index was never used.
DROP INDEX IF EXISTS idx_messages_recipient;
-- idx_messages_created_at: no query filters or orders by created_at alone (page filters
-- on created_at always come with a sender/recipient or channel range).
DROP INDEX IF EXISTS idx_messages_created_at;
-- 1:1 messages have no channel: keep them out of the channel index (`channel_id = ?`
-- implies the partial index's condition, so channel history still uses it).
DROP INDEX IF EXISTS idx_messages_channel;
CREATE INDEX idx_messages_channel ON messages (channel_id, id) WHERE channel_id IS NOT NULL;
