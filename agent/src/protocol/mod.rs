//! Protocol handlers. Each one owns its wire format; `tcp` forwards bytes unchanged;
//! `postgres` speaks the PostgreSQL protocol to both sides.
pub mod postgres;
pub mod tcp;
