//! What a client holds while it lives, and that it lets go of everything once closed: the
//! clients of one runtime share one UDP socket (QUIC endpoint), and a closed client leaves no
//! task, socket or endpoint behind. One test in this file, so the process-wide counts (open
//! file descriptors) are its own.

mod common;

use std::time::Duration;

use canopy_sdk::{Client, Filter, ReplayMode, SubEvent};
use common::*;

/// Sockets this process has open.
fn sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Waits until `done` holds, failing with `what` after [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_share_one_socket_and_a_closed_client_leaves_nothing_behind() {
    const CLIENTS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let (sockets_before, tasks_before) = (sockets(), alive_tasks());

    for round in 0..3u128 {
        let mut clients: Vec<Client> = Vec::new();
        let mut subs = Vec::new();
        for i in 0..CLIENTS {
            let client = client(&relay).await;
            let mut sub = client.subscribe(Filter::ALL, ReplayMode::LiveOnly).await.unwrap();
            assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);
            within("ack", client.publish(chunk(round * 1000 + i as u128, "x"))).await.unwrap();
            clients.push(client);
            subs.push(sub);
        }
        // One socket for all of them (it was one each).
        assert_eq!(sockets() - sockets_before, 1, "round {round}: sockets opened for {CLIENTS} clients");
        // Close half, drop the other half (with their subscriptions).
        for client in &clients[..CLIENTS / 2] {
            client.close();
        }
        drop(subs);
        drop(clients);
        eventually("the clients' tasks to end", || alive_tasks() == tasks_before).await;
        eventually("the clients' socket to close", || sockets() == sockets_before).await;
        assert_eq!(canopy_sdk::open_endpoints(), 0);
    }
    eventually("the relay to see every connection close", || relay.metrics().links == 0).await;
    relay.shutdown().await;
}
