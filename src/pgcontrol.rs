//! Reading `global/pg_control` (ControlFileData) for PostgreSQL 13–18.
