-- Initial schema: identity (users, refresh tokens, audit log) and messaging
-- (device keys, channels, messages, offline queue, outbox).
-- Times are BIGINT milliseconds since the epoch; JSON is stored as TEXT.

CREATE TABLE users (
    user_key TEXT PRIMARY KEY,          -- lowercased user_id: the case-insensitive identity
    user_id TEXT NOT NULL UNIQUE,       -- spelling as registered
    password_hash TEXT NOT NULL,
    display_name TEXT NOT NULL,
    roles TEXT NOT NULL,                -- JSON array of role names
    created_at BIGINT NOT NULL,
    deleted_at BIGINT,
    deletion_scheduled_at BIGINT
);

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,        -- sha256 hex; the token itself is never stored
    user_id TEXT NOT NULL,
    family_id TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    revoked_at BIGINT,
    device_id TEXT
);
CREATE INDEX idx_refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX idx_refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE audit_log (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor TEXT,
    action TEXT NOT NULL,
    target TEXT,
    at BIGINT NOT NULL,
    ip TEXT,
    detail TEXT
);
CREATE INDEX idx_audit_log_at ON audit_log (at);
CREATE INDEX idx_audit_log_actor ON audit_log (actor, id);

CREATE TABLE device_keys (
    bundle_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    public_key TEXT NOT NULL,           -- PEM
    registered_at BIGINT NOT NULL,
    last_used_at BIGINT,
    UNIQUE (user_id, device_id)
);

CREATE TABLE channels (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    settings TEXT NOT NULL,             -- JSON object of strings
    created_at BIGINT NOT NULL
);
CREATE INDEX idx_channels_owner ON channels (owner_id);

CREATE TABLE channel_members (
    channel_id TEXT NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (channel_id, user_id)
);
-- "my channels" and peers_of() start from the user
CREATE INDEX idx_channel_members_user ON channel_members (user_id, channel_id);

CREATE TABLE messages (
    -- UUIDv7: ORDER BY id is ORDER BY time; COLLATE "C" so ids compare bytewise
    -- (as in SQLite) whatever the database's default collation
    id TEXT COLLATE "C" PRIMARY KEY,
    sender_id TEXT NOT NULL,
    recipient_id TEXT,
    channel_id TEXT,
    encrypted_content TEXT NOT NULL,
    iv TEXT NOT NULL,
    keys TEXT NOT NULL,                 -- JSON object deviceId -> wrapped key
    created_at BIGINT NOT NULL,
    client_message_id TEXT,
    CHECK ((recipient_id IS NULL) <> (channel_id IS NULL))
);
-- 1:1 history pages walk (sender, recipient) in id order, one index per direction
CREATE INDEX idx_messages_sender ON messages (sender_id, recipient_id, id);
CREATE INDEX idx_messages_recipient ON messages (recipient_id, sender_id, id);
CREATE INDEX idx_messages_created_at ON messages (created_at DESC);
CREATE INDEX idx_messages_channel ON messages (channel_id, id);
CREATE UNIQUE INDEX idx_messages_client_id ON messages (sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

-- Who has exchanged 1:1 messages with whom (both directions), for peers_of():
-- maintained by insert_message so presence never scans message history.
CREATE TABLE direct_peers (
    user_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    since BIGINT NOT NULL,
    PRIMARY KEY (user_id, peer_id)
);

CREATE TABLE offline_queue (
    user_id TEXT NOT NULL,
    message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    queued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, message_id)
);
CREATE INDEX idx_offline_queue_user ON offline_queue (user_id, queued_at);
CREATE INDEX idx_offline_queue_expires ON offline_queue (expires_at);
CREATE INDEX idx_offline_queue_message ON offline_queue (message_id);

CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    key TEXT,
    payload BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    sent_at BIGINT
);
CREATE INDEX idx_outbox_unsent ON outbox (created_at, id) WHERE sent_at IS NULL;
CREATE INDEX idx_outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
