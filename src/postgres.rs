//! Postgres for local mode: the one named by DATABASE_URL, or a private throwaway cluster.
