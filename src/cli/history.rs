//! `ember history` (the invocation history, newest first) and `ember usage` (GPU time per
//! function, node or GPU).

use clap::Args;

use crate::client::ApiClient;
use crate::history::query::Page;
use crate::history::usage::Usage;

/// `ember history`'s filters.
#[derive(Debug, Clone, Default, Args)]
pub struct HistoryArgs {
    /// Only this function's invocations.
    #[arg(long)]
    pub function: Option<String>,
    /// Only those served on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only those served with this GPU (or MIG) uuid.
    #[arg(long)]
    pub gpu: Option<String>,
    /// Only those with this status: `503`, `5xx`, `error` (Ember answered), or an error
    /// code such as `queue_timeout`.
    #[arg(long)]
    pub status: Option<String>,
    /// Only those since: a duration back from now (`1h`) or a time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only those until: a duration back from now or a time.
    #[arg(long)]
    pub until: Option<String>,
    /// How many to show (the newest).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print the records as JSON (one page of the API's answer).
    #[arg(long)]
    pub json: bool,
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    q.finish()
}

/// `ember history`: pages through the API until `--limit` records are shown.
pub async fn history(client: &ApiClient, args: HistoryArgs) -> anyhow::Result<()> {
    let mut shown = Vec::new();
    let mut cursor = None;
    while shown.len() < args.limit {
        let want = (args.limit - shown.len()).min(crate::history::query::MAX_LIMIT);
        let q = query(&[
            ("function", args.function.clone()),
            ("node", args.node.clone()),
            ("gpu", args.gpu.clone()),
            ("status", args.status.clone()),
            ("since", args.since.clone()),
            ("until", args.until.clone()),
            ("limit", Some(want.to_string())),
            ("cursor", cursor.take()),
        ]);
        let v = client.get_json(&format!("/api/v1/invocations?{q}")).await?;
        let page: Page = serde_json::from_value(v)?;
        shown.extend(page.invocations);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    if shown.is_empty() {
        println!("no invocations match");
        return Ok(());
    }
    println!(
        "{:<16} {:<20} {:<24} {:<6} {:>6} {:<4} {:>8} {:>9}  {:<12} {:<10} GPUS",
        "ID",
        "TIME",
        "FUNCTION",
        "METHOD",
        "STATUS",
        "COLD",
        "QUEUE",
        "DURATION",
        "INSTANCE",
        "NODE"
    );
    for r in shown {
        let queued = r
            .started_at_us
            .unwrap_or(r.finished_at_us)
            .saturating_sub(r.queued_at_us);
        let took = r.finished_at_us.saturating_sub(r.queued_at_us);
        let status = match &r.error {
            Some(code) => format!("{} {code}", r.status),
            None => r.status.to_string(),
        };
        println!(
            "{:<16} {:<20} {:<24} {:<6} {:>6} {:<4} {:>8} {:>9}  {:<12} {:<10} {}",
            r.id,
            time(r.queued_at_us),
            r.function,
            r.method,
            status,
            if r.cold { "yes" } else { "" },
            ms(queued),
            ms(took),
            r.instance.as_deref().unwrap_or("-"),
            r.node.as_deref().unwrap_or("-"),
            if r.gpus.is_empty() {
                "-".to_string()
            } else {
                r.gpus.join(",")
            },
        );
    }
    Ok(())
}

/// `ember usage`'s options.
#[derive(Debug, Clone, Default, Args)]
pub struct UsageArgs {
    /// The window's start: a duration back from now or a time.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Its end (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// One row per `function`, `node` or `gpu`.
    #[arg(long, default_value = "function")]
    pub by: String,
    /// Print the API's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ember usage`.
pub async fn usage(client: &ApiClient, args: UsageArgs) -> anyhow::Result<()> {
    let q = query(&[
        ("since", Some(args.since.clone())),
        ("until", args.until.clone()),
        ("by", Some(args.by.clone())),
    ]);
    let v = client.get_json(&format!("/api/v1/usage?{q}")).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let u: Usage = serde_json::from_value(v)?;
    println!(
        "{} to {}, by {}",
        time(u.since_us),
        time(u.until_us),
        args.by
    );
    println!(
        "{:<40} {:>12} {:>10} {:>10} {:>6} {:>12} {:>11} {:>6} {:>6}",
        args.by.to_uppercase(),
        "GPU-S ALLOC",
        "PAUSED",
        "BUSY",
        "BUSY%",
        "INSTANCE-S",
        "INVOCATIONS",
        "COLD",
        "STARTS"
    );
    for r in u.rows.iter().chain(std::iter::once(&u.total)) {
        println!(
            "{:<40} {:>12.1} {:>10.1} {:>10.1} {:>6} {:>12.1} {:>11} {:>6} {:>6}",
            r.key,
            r.gpu_seconds_allocated,
            r.gpu_seconds_paused,
            r.gpu_seconds_busy,
            r.busy_ratio
                .map_or("-".to_string(), |x| format!("{:.1}", x * 100.0)),
            r.instance_seconds,
            r.invocations,
            r.cold_invocations,
            r.cold_starts,
        );
    }
    Ok(())
}

/// Unix µs as a UTC time to the second.
fn time(us: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ms(us: u64) -> String {
    if us >= 10_000_000 {
        format!("{:.1}s", us as f64 / 1e6)
    } else {
        format!("{:.1}ms", us as f64 / 1e3)
    }
}
