//! The cluster demo (`examples/cluster`) in its quick mode: its table must
//! say that every view converged and that the killed node's clients failed
//! over — and its check must be able to fail. The demo's engine is included
//! from the example's source, so this runs exactly the example's code.

mod cluster_support;

#[path = "../examples/cluster/demo.rs"]
mod demo;

use clap::Parser;

async fn run(args: &[&str]) -> Option<demo::Report> {
    let url = cluster_support::url().await?;
    let mut argv = vec!["cluster", "--quick", "--nats-url", &url];
    argv.extend_from_slice(args);
    Some(demo::run(demo::Config::parse_from(argv)).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cluster_converges_and_fails_over() {
    let Some(report) = run(&["--nodes", "3"]).await else {
        return;
    };
    let summary = report.summary();
    println!("{summary}");
    assert!(report.ok(), "{summary}");
    assert!(
        summary.contains("every view converged: yes (6/6"),
        "{summary}"
    );
    assert!(summary.contains("verdict: OK"), "{summary}");
    assert_eq!(report.nodes.len(), 3);
    assert_eq!(report.clients.len(), 6, "2 clients per node");
    let killed: Vec<_> = report.nodes.iter().filter(|n| n.killed).collect();
    assert_eq!(killed.len(), 1, "{summary}");
    assert_eq!(killed[0].subscribers, (2, 0), "{summary}");
    for n in report.nodes.iter().filter(|n| !n.killed) {
        assert_eq!(n.applied, report.last_index, "{summary}");
    }
    assert_eq!(
        report.nodes.iter().map(|n| n.subscribers.1).sum::<usize>(),
        6,
        "every client ends on a live node: {summary}"
    );
    for c in &report.clients {
        assert_eq!(c.failed_over(), c.started_on == report.killed, "{summary}");
        assert_eq!(c.duplicates, 0, "{summary}");
        assert_eq!(
            c.snapshots, 1,
            "no new snapshot after a failover: {summary}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cluster_reports_a_broken_view() {
    let Some(report) = run(&["--nodes", "2", "--break-a-view"]).await else {
        return;
    };
    let summary = report.summary();
    assert!(!report.ok(), "{summary}");
    assert!(
        summary.contains("every view converged: no (3/4"),
        "{summary}"
    );
    assert!(summary.contains("NO (1 keys differ)"), "{summary}");
    assert!(
        summary.ends_with("verdict: FAILED (see the rows above)"),
        "{summary}"
    );
}
