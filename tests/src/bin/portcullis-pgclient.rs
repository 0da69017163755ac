//! A tokio-postgres client for the end-to-end tests: runs each SQL argument with the extended
//! protocol (binary result format, as tokio-postgres always asks) on one connection and prints
//! one JSON line per statement. Run inside the test cgroup, so its connect is redirected.
//!
//! usage: portcullis-pgclient "<libpq conninfo>" <sql>...

#![allow(
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test client: a broken invocation should fail loudly"
)]

use tokio_postgres::types::Type;
use tokio_postgres::NoTls;

fn value(row: &tokio_postgres::Row, i: usize) -> serde_json::Value {
    let ty = row.columns()[i].type_().clone();
    let v = if ty == Type::INT4 {
        row.get::<_, Option<i32>>(i).map(serde_json::Value::from)
    } else if ty == Type::INT8 {
        row.get::<_, Option<i64>>(i).map(serde_json::Value::from)
    } else if ty == Type::BOOL {
        row.get::<_, Option<bool>>(i).map(serde_json::Value::from)
    } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(&ty) {
        row.get::<_, Option<String>>(i).map(serde_json::Value::from)
    } else if ty == Type::JSONB || ty == Type::JSON {
        row.get::<_, Option<serde_json::Value>>(i)
    } else {
        Some(serde_json::Value::from(format!("<{}>", ty.name())))
    };
    v.unwrap_or(serde_json::Value::Null)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let conninfo = args
        .next()
        .expect("usage: portcullis-pgclient <conninfo> <sql>...");
    let (client, connection) = match tokio_postgres::connect(&conninfo, NoTls).await {
        Ok(x) => x,
        Err(e) => {
            let code = e.code().map(|c| c.code().to_string());
            println!(
                "{}",
                serde_json::json!({"connect_error": e.to_string(), "code": code})
            );
            std::process::exit(2);
        }
    };
    let conn = tokio::spawn(connection);
    for sql in args {
        let line = match client.query(sql.as_str(), &[]).await {
            Ok(rows) => {
                let rows: Vec<Vec<serde_json::Value>> = rows
                    .iter()
                    .map(|r| (0..r.len()).map(|i| value(r, i)).collect())
                    .collect();
                serde_json::json!({"sql": sql, "rows": rows})
            }
            Err(e) => {
                let db = e.as_db_error();
                serde_json::json!({
                    "sql": sql,
                    "error": db.map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()),
                    "code": db.map(|d| d.code().code().to_string()),
                    "detail": db.and_then(|d| d.detail().map(str::to_string)),
                })
            }
        };
        println!("{line}");
    }
    drop(client);
    let _ = conn.await;
}
