//! Connects to a QMP socket, prints `query-status`, then follows events until the connection
//! closes: `cargo run -p qmp-tokio --example tokio_status -- /path/to/qmp.sock`.

use qmp_tokio::{Builder, EventFilter, EventItem};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), qmp_tokio::Error> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/qmp.sock".to_owned());
    let (client, connection) = qmp_tokio::connect_unix(&path, Builder::new()).await?;
    // Subscribed before the driver runs, so that no event since the greeting is missed.
    let mut events = client.subscribe(EventFilter::all());
    let driver = qmp_tokio::spawn_connection(connection);
    if let Some(g) = client.greeting() {
        println!("connected to QEMU {}", g.version);
    }
    let status: serde_json::Value = client.execute("query-status", &()).await?;
    println!("status: {status}");
    while let Some(item) = events.recv().await {
        match item {
            EventItem::Event(ev) => println!("event {} {:?}", ev.name, ev.data),
            EventItem::Lagged(n) => println!("missed {n} events"),
            EventItem::Closed(reason) => println!("closed: {reason:?}"),
            _ => {}
        }
    }
    driver.await.expect("the driver task panicked")
}
