-- The user directory (GET /api/v1/users?query=): a prefix of a name or an
-- email, paged by name. Both indexes use the "C" collation, under which a
-- btree serves LIKE 'prefix%' whatever the database's collation, and the
-- name index also carries the keyset order (lower(full_name), id), so a
-- page is one index range.
CREATE INDEX users_directory_name_idx ON users ((lower(full_name) COLLATE "C"), id);
CREATE INDEX users_directory_email_idx ON users ((email COLLATE "C"));
