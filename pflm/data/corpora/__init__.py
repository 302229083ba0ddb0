"""Built-in corpora for `pflm prepare --corpus`: `chitchat` (real messages, one user per sender) and `synthetic`
(seeded voice-assistant transcripts with per-user profiles). Each module yields (user, text) rows."""
