//! Opens and holds idle PostgreSQL sessions with TLS through the agent (see
//! `portcullis_e2e::idle_tls`).

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    portcullis_e2e::idle_tls::run(&args)
}
