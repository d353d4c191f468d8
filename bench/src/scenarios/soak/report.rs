//! Renders `SOAK.md` (also printed at the end of a run) from a [`Soak`].

use std::fmt::Write as _;
use std::time::Duration;

use super::load::SLOW;
use super::{
    CACHE_MAX_TENANTS, EARLY_TOLERANCE, FaultKind, LIFETIME_SECS, MEMORY_GROWTH_FLOOR_KIB,
    MEMORY_GROWTH_PERCENT, MemoryRow, SETTLE, Settings, Soak,
};
use crate::report::{kib_mib, machine_rows, verdict};
use crate::stats::{micros, ms};

/// `m:ss` of a moment after the start of the load.
fn clock(at: Duration) -> String {
    let secs = at.as_secs();
    format!("{}:{:02}", secs / 60, secs % 60)
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// The whole document.
pub fn render(soak: &Soak) -> String {
    let mut out = String::new();
    let goals = soak.goals();
    let missed = goals.iter().filter(|goal| !goal.met).count();
    let _ = writeln!(out, "# Soak\n");
    let _ = writeln!(
        out,
        "Written by `{}` on {} (commit `{}`): {:.1} minutes of load, a fault every {} s. \
         Everything ran on loopback on the machine below.\n",
        soak.settings.command_line,
        soak.date,
        soak.machine.commit,
        soak.duration.as_secs_f64() / 60.0,
        soak.settings.fault_every.as_secs()
    );
    let _ = writeln!(
        out,
        "**{}**\n",
        if missed == 0 {
            "Every goal met.".to_owned()
        } else {
            format!("{missed} of {} goals missed.", goals.len())
        }
    );
    let _ = writeln!(out, "| goal | result | numbers |\n|---|---|---|");
    for goal in &goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            goal.name,
            verdict(goal.met),
            goal.detail
        );
    }
    let _ = writeln!(out);
    setup(&mut out, soak);
    expectations(&mut out);
    faults(&mut out, soak);
    requests(&mut out, soak);
    minutes(&mut out, soak);
    tokens(&mut out, soak);
    memory(&mut out, soak);
    counters(&mut out, soak);
    log_warnings(&mut out, soak);
    out
}

fn setup(out: &mut String, soak: &Soak) {
    let s = &soak.settings;
    let m = &soak.machine;
    let _ = writeln!(out, "## Setup\n");
    let _ = writeln!(
        out,
        "2 Envoys with 2 workers each run the filter; Envoy *i* talks to companion *i*; both \
         companions share one `redis-server`. The Tenant Service and Genesys login stand-ins \
         run in the load generator's process, the echo upstream in its own. {} Genesys tenants \
         active at once (generated `bench-<n>`), tokens living {LIFETIME_SECS} s \
         (`expires_in`). The load: {} connections, each a keep-alive connection to one Envoy \
         (alternating) sending paced `GET`s that step through the active tenants, {} \
         requests/s together. {} The filter's configuration:\n",
        s.tenants,
        s.connections,
        s.rate,
        churn(soak)
    );
    let _ = writeln!(out, "```json\n{}\n```\n", soak.filter_config);
    let _ = writeln!(
        out,
        "So a token's refresh window opens {} after its issue (`refreshAhead`: the last {} % \
         of its life, at least `minLeadMs`); its refresh starts at a moment in the first half \
         of that window, different for every token (a jitter of the tenant and the token's \
         expiry), so between {} and {} after its issue. It is served until {} after its issue \
         (`expiryMarginMs`). The companions and the rest of the filter run with their \
         defaults.\n",
        seconds(Settings::refresh_window_start()),
        super::REFRESH_PERCENT,
        seconds(Settings::refresh_window_start()),
        seconds(Settings::refresh_latest()),
        seconds(Settings::served_for())
    );
    machine_rows(out, m);
    let _ = writeln!(out, "| Redis | {} |", m.redis);
    let _ = writeln!(out, "| command | `{}` |", s.command_line);
    let _ = writeln!(out, "| date | {} |", soak.date);
    let _ = writeln!(
        out,
        "| load average at start (1, 5, 15 min) | {} |",
        soak.load.0
    );
    let _ = writeln!(out, "| load average at end | {} |", soak.load.1);
    for (what, text) in &soak.binaries {
        let _ = writeln!(out, "| {what} | {text} |");
    }
    let _ = writeln!(out);
    if let Some(note) = &s.note {
        let _ = writeln!(out, "{note}\n");
    }
}

/// The churn settings and what they did, in a sentence or three.
fn churn(soak: &Soak) -> String {
    let s = &soak.settings;
    let bound = format!(
        "The gateway cache is bounded to {CACHE_MAX_TENANTS} tenants per Envoy \
         (`cache.maxTenants`; the default is 100,000)"
    );
    if s.churn_every.is_zero() {
        return format!(
            "No tenant churn (`--churn-every-secs 0`): the same tenants throughout; {} \
             tenants were seen. {bound}, more than the tenants, so it never fills.",
            soak.tokens.tenants_seen
        );
    }
    let active = s.tenants as f64 * s.churn_every.as_secs_f64();
    format!(
        "Tenant churn: every {} the oldest active tenant leaves (no more requests for it) and a \
         never-seen one joins, so each tenant is active for {active:.0} s (about {:.0} token \
         generations) and {} distinct tenants were seen (issued a token). {bound}, a few times \
         the active set: its slots are reused as tenants come and go, and a tenant may be \
         pushed out while still active, to be served again from the companion's Redis (a \
         lease `hit`, no OAuth call). So the memory goal tests the bound, not a cache that \
         never fills.",
        seconds(s.churn_every),
        active / mean_refresh().as_secs_f64(),
        soak.tokens.tenants_seen,
    )
}

/// The mean time from a token to its refresh: the moments spread evenly over the first
/// half of the refresh window.
fn mean_refresh() -> Duration {
    (Settings::refresh_window_start() + Settings::refresh_latest()) / 2
}

fn expectations(out: &mut String) {
    let _ = writeln!(out, "## Faults and what a client may see\n");
    let _ = writeln!(
        out,
        "The IdP and Tenant Service bursts are held from the first call that meets them; \
         the Redis and companion faults strike at the next OAuth call, while a refresh is \
         under way (its lease taken, its commit to come), not in a quiet moment between \
         refreshes.\n"
    );
    let _ = writeln!(
        out,
        "A failure is any answer but a 200 whose upstream saw a token of the request's own \
         tenant that had not expired (by the issue time the tracker saw), and any request \
         without an answer. It is *expected* only when the README documents it for a fault \
         under way: it was sent between the fault's start and {} after its end, and its code \
         is in the fault's row below. A tenant that just joined has no token to serve while \
         its first fetch meets an IdP or Tenant Service fault, so it may see the error the \
         README documents for a fetch that fails through its retries; a tenant with a token \
         may not. Every other failure is unexpected.\n",
        seconds(SETTLE)
    );
    let _ = writeln!(
        out,
        "| fault | what is done | errors a client may see | extra OAuth calls per tenant |\n|---|---|---|---|"
    );
    for kind in FaultKind::CYCLE {
        let allowed = kind.extra_tokens_allowed(Settings::refresh_window_start());
        let codes = kind.expected_codes();
        let mut errors = if codes.is_empty() {
            "none".to_owned()
        } else {
            codes
                .iter()
                .map(|c| format!("`503 {c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if kind.expected_codes_without_token() != codes {
            let _ = write!(
                errors,
                "; to a tenant without a token yet (one that just joined): {}",
                kind.expected_codes_without_token()
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = writeln!(
            out,
            "| {} | {} | {errors} | {} |",
            kind.name(),
            kind.describe(),
            kind.extra_tokens_reason().map_or_else(
                || "none".to_owned(),
                |why| format!("up to {allowed}: {why}")
            )
        );
    }
    let _ = writeln!(
        out,
        "\nWhy none for the others: the IdP and Tenant Service faults last at most 2 s, and a \
         failed background refresh still leaves the cached token to serve until {} after its \
         issue; the token then missing is fetched after the fault (the filter's retries, \
         500 ms x 2^n or `Retry-After`, bridge the rest). A slow IdP delays refreshes by \
         {} ms, inside the {} between the latest refresh moment and the end of service. A companion \
         that does not answer sends the filter to local mode (README, \"Degraded modes\"); \
         a fetch whose commit finds its companion gone leaves the lock in Redis until \
         `--lock-ttl-ms` (README, \"Shutdown\"), so other leases of that tenant may wait that \
         long: slow requests, no errors. \
         `CACHE_UNAVAILABLE` is documented for Redis: \"Until the threshold is reached, \
         requests that need Redis answer 503 CACHE_UNAVAILABLE\". Extra OAuth calls are \
         allowed per tenant once for every refresh (at most one each {}) that can fall into the \
         fault plus the filter's 5 s of local mode after it.\n",
        seconds(Settings::served_for()),
        super::faults::IDP_SLOW.as_millis(),
        seconds(Settings::served_for() - Settings::refresh_latest()),
        seconds(Settings::refresh_window_start())
    );
}

fn faults(out: &mut String, soak: &Soak) {
    let _ = writeln!(out, "## Faults injected\n");
    let _ = writeln!(
        out,
        "Per fault, from its start to {} after its end: client failures, requests slower than \
         {} ms and the slowest, OAuth calls beyond one per token generation.\n",
        seconds(SETTLE),
        SLOW.as_millis()
    );
    let _ = writeln!(
        out,
        "| # | at | fault | what happened | failures (expected / unexpected) | slower than {} ms | slowest | extra OAuth calls |\n|---:|---|---|---|---:|---:|---:|---:|",
        SLOW.as_millis()
    );
    for (index, fault) in soak.faults.iter().enumerate() {
        let failures: Vec<_> = soak
            .failures
            .iter()
            .filter(|f| fault.covers(f.at))
            .collect();
        let expected = failures.iter().filter(|f| f.expected).count();
        let slow: Vec<u64> = soak
            .slow
            .iter()
            .filter(|(at, _)| fault.covers(*at))
            .map(|(_, latency)| *latency)
            .collect();
        let extras = soak
            .tokens
            .extras
            .iter()
            .filter(|e| fault.covers(e.at))
            .count();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            index + 1,
            clock(fault.at),
            fault.kind.name(),
            fault.detail,
            expected,
            failures.len() - expected,
            slow.len(),
            slow.iter()
                .max()
                .map_or_else(|| "-".to_owned(), |max| ms(*max)),
            extras
        );
    }
    let outside: Vec<u64> = soak
        .slow
        .iter()
        .filter(|(at, _)| !soak.faults.iter().any(|f| f.covers(*at)))
        .map(|(_, latency)| *latency)
        .collect();
    let _ = writeln!(
        out,
        "\nOutside every fault's window: {} requests slower than {} ms (slowest {}).\n",
        outside.len(),
        SLOW.as_millis(),
        outside
            .iter()
            .max()
            .map_or_else(|| "-".to_owned(), |max| ms(*max))
    );
}

fn requests(out: &mut String, soak: &Soak) {
    let _ = writeln!(out, "## Requests\n");
    let _ = writeln!(
        out,
        "{} requests in {:.1} minutes ({:.0}/s; target {}/s), {} failed.\n",
        soak.requests,
        soak.duration.as_secs_f64() / 60.0,
        soak.requests as f64 / soak.duration.as_secs_f64().max(1e-9),
        soak.settings.rate,
        soak.failures.len()
    );
    if soak.failures.is_empty() {
        return;
    }
    let mut groups: Vec<(u16, &str, usize, usize, Duration, Duration)> = Vec::new();
    for failure in &soak.failures {
        match groups
            .iter_mut()
            .find(|g| g.0 == failure.status && g.1 == failure.code)
        {
            Some(group) => {
                group.2 += usize::from(failure.expected);
                group.3 += usize::from(!failure.expected);
                group.5 = failure.at;
            }
            None => groups.push((
                failure.status,
                failure.code.as_str(),
                usize::from(failure.expected),
                usize::from(!failure.expected),
                failure.at,
                failure.at,
            )),
        }
    }
    let _ = writeln!(
        out,
        "| status | code | expected | unexpected | first | last |\n|---:|---|---:|---:|---|---|"
    );
    for (status, code, expected, unexpected, first, last) in groups {
        let _ = writeln!(
            out,
            "| {} | `{}` | {expected} | {unexpected} | {} | {} |",
            if status == 0 {
                "-".to_owned()
            } else {
                status.to_string()
            },
            code.replace('|', "/"),
            clock(first),
            clock(last)
        );
    }
    let _ = writeln!(out);
}

fn minutes(out: &mut String, soak: &Soak) {
    let _ = writeln!(out, "## Latency per minute\n");
    let _ = writeln!(
        out,
        "Successful requests, by the minute they were sent in; the client's own time \
         (connection, Envoy, filter, echo upstream, back).\n"
    );
    let _ = writeln!(
        out,
        "| minute | requests | p50 | p99 | max | failures | fault begun |\n|---:|---:|---:|---:|---:|---:|---|"
    );
    for (index, minute) in soak.minutes.iter().enumerate() {
        let l = &minute.latency;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            index + 1,
            l.count,
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.max_us),
            minute.failures,
            minute
                .faults
                .iter()
                .map(|kind| kind.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(out);
}

fn tokens(out: &mut String, soak: &Soak) {
    let t = &soak.tokens;
    let _ = writeln!(out, "## OAuth calls\n");
    let mut per_tenant = t.per_tenant.clone();
    per_tenant.sort_unstable();
    let median = per_tenant.get(per_tenant.len() / 2).copied().unwrap_or(0);
    let active = t.active_time.as_secs_f64();
    let mean = mean_refresh().as_secs_f64();
    let _ = writeln!(
        out,
        "A tenant's token is refreshed between {} and {} after its issue ({mean:.2} s on \
         average), so one OAuth call per token generation is about one call per {mean:.2} s a \
         tenant is active, plus its first token: the tenants were active for {:.0} s in all \
         during the load, about {:.0} calls. Each token issued is matched to the newest earlier \
         token of its tenant whose refresh window has opened (with {} ms of tolerance) and has \
         no successor yet; a token with none is an extra call (after two Envoys fetched at \
         once, the refresh of either token counts as the successor, the parallel fetch as the \
         extra call). A tenant's first token (the warm-up's, or the one its first request \
         fetched when it joined) is its generation 0, never an extra call. A tenant that left \
         is expected nothing; a token issued to it more than {} after it left is a call no \
         request asked for. A token re-fetched because its tenant was pushed out of the \
         gateway cache comes from the companion's Redis and costs no OAuth call: were it to, \
         it would show here as an extra call. A successor issued after its predecessor stopped \
         being served is late: requests waited for it.\n",
        seconds(Settings::refresh_window_start()),
        seconds(Settings::refresh_latest()),
        active,
        active / mean,
        EARLY_TOLERANCE.as_millis(),
        seconds(SETTLE)
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(
        out,
        "| OAuth calls (login stand-in) | {} ({} tokens issued, {} answered with an injected fault) |",
        t.login_calls,
        t.issued,
        t.login_calls.saturating_sub(t.issued)
    );
    let _ = writeln!(out, "| Tenant Service calls | {} |", t.tenant_service_calls);
    let _ = writeln!(
        out,
        "| tenants seen (issued a token) / active during the load | {} / {} |",
        t.tenants_seen,
        t.per_tenant.len()
    );
    let _ = writeln!(
        out,
        "| tokens issued to a tenant after it left | {} |",
        t.after_leaving.len()
    );
    let _ = writeln!(
        out,
        "| tokens per tenant (min / median / max) | {} / {median} / {} |",
        per_tenant.first().copied().unwrap_or(0),
        per_tenant.last().copied().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "| time from a token to its successor (min / p50 / p99 / max) | {} / {} / {} / {} |",
        ms(t.intervals.min_us),
        ms(t.intervals.p50_us),
        ms(t.intervals.p99_us),
        ms(t.intervals.max_us)
    );
    let _ = writeln!(
        out,
        "| successors on time / late / extra | {} / {} / {} |",
        t.on_time,
        t.late.len(),
        t.extras.len()
    );
    let _ = writeln!(out);
    if !t.late.is_empty() {
        let _ = writeln!(
            out,
            "Late successors at: {}.\n",
            t.late
                .iter()
                .map(|at| clock(*at))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !t.after_leaving.is_empty() {
        let _ = writeln!(
            out,
            "Tokens issued after their tenant left: {}.\n",
            t.after_leaving
                .iter()
                .map(|(at, tenant)| format!("{tenant} at {}", clock(*at)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if t.extras.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "| at | tenant | after the tenant's previous token | explained by |\n|---|---|---:|---|"
    );
    for extra in &t.extras {
        let explained = extra.fault.map_or_else(
            || "**nothing**".to_owned(),
            |index| {
                let fault = &soak.faults[index];
                format!(
                    "fault {} ({} at {})",
                    index + 1,
                    fault.kind.name(),
                    clock(fault.at)
                )
            },
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {explained} |",
            clock(extra.at),
            extra.tenant,
            ms(micros(extra.after))
        );
    }
    let _ = writeln!(out);
}

fn memory(out: &mut String, soak: &Soak) {
    let _ = writeln!(out, "## Memory\n");
    let per_envoy = soak.requests / 2;
    let envoy_bound = soak
        .memory
        .iter()
        .filter(|row| row.process.starts_with("envoy"))
        .filter_map(MemoryRow::bound_kib)
        .min()
        .unwrap_or(MEMORY_GROWTH_FLOOR_KIB);
    let _ = writeln!(
        out,
        "`VmRSS` of `/proc/<pid>/status`, every 10 s. Growth is measured from the first \
         reading {} after the load or the process started (whichever is later) to the last; \
         the bound is {MEMORY_GROWTH_PERCENT} % of that reading or {}, whichever is larger. \
         Readings vary by well under 1 MiB when nothing leaks; for an Envoy, which served \
         about {per_envoy} requests, the bound catches a leak of {} bytes per request or more.\n",
        seconds(soak.settings.warmup),
        kib_mib(MEMORY_GROWTH_FLOOR_KIB),
        envoy_bound * 1024 / per_envoy.max(1)
    );
    let _ = writeln!(
        out,
        "| process | pid | first | max | last | warm-up reading | growth | bound | |\n|---|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for row in &soak.memory {
        let (baseline, growth, bound, result) =
            match (row.baseline, row.growth_kib(), row.bound_kib()) {
                (Some((at, base)), Some(growth), Some(bound)) => (
                    format!("{} at {}", kib_mib(base), clock(at)),
                    format!("{:+.1} MiB", growth as f64 / 1024.0),
                    kib_mib(bound),
                    verdict(row.within()),
                ),
                _ => (
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    "too short to judge",
                ),
            };
        let _ = writeln!(
            out,
            "| {} | {} | {} at {} | {} | {} at {} | {baseline} | {growth} | {bound} | {result} |",
            row.process,
            row.pid,
            kib_mib(row.first.1),
            clock(row.first.0),
            kib_mib(row.max_kib),
            kib_mib(row.last.1),
            clock(row.last.0)
        );
    }
    let _ = writeln!(out);
}

fn counters(out: &mut String, soak: &Soak) {
    let _ = writeln!(out, "## Counters\n");
    let _ = writeln!(
        out,
        "The filter's stats summed over both Envoys, and the companions' lease outcomes and \
         Redis health transitions (a restarted companion counts from its restart); counters \
         that stayed 0 are left out.\n"
    );
    let _ = writeln!(out, "| counter | value |\n|---|---:|");
    for (name, value) in soak.envoy_stats.iter().chain(&soak.companion_metrics) {
        if *value > 0 {
            let _ = writeln!(out, "| `{name}` | {value} |");
        }
    }
    let _ = writeln!(out);
}

/// Lines of the same message shown at most.
const LOG_GROUPS: usize = 15;

fn log_warnings(out: &mut String, soak: &Soak) {
    let _ = writeln!(
        out,
        "## Warnings and errors in the logs
"
    );
    let total: usize = soak.log_warnings.iter().map(|lines| lines.count).sum();
    let _ = writeln!(
        out,
        "{total} lines at warn or error in the Envoy and companion logs (Envoy and the \
         companions at info), grouped by message with numbers replaced by `#`; the {} most \
         frequent. Most belong to the faults; a message that repeats without one is worth a \
         look. The logs of the last run are in `{}`.\n",
        LOG_GROUPS.min(soak.log_warnings.len()),
        soak.settings.logs.display()
    );
    if soak.log_warnings.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "| process | level | lines | message |\n|---|---|---:|---|"
    );
    for lines in soak.log_warnings.iter().take(LOG_GROUPS) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | `{}` |",
            lines.process,
            lines.level,
            lines.count,
            lines.message.replace('|', "/").replace('`', "'")
        );
    }
    let _ = writeln!(out);
}
