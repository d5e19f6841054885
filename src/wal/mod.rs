//! Sans-IO WAL decoder (PostgreSQL 13–18).
