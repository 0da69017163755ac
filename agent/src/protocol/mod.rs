//! Protocol handlers. Each one owns its wire format; `tcp` forwards bytes unchanged.
pub mod tcp;
