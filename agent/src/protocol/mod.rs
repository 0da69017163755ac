//! Protocol handlers. Each one owns its wire format; `tcp` forwards bytes unchanged;
//! `postgres` speaks the PostgreSQL protocol to both sides; `ssh` terminates SSH on both
//! legs and relays session channels.
pub mod postgres;
pub mod ssh;
pub mod tcp;
