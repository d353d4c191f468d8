//! What the soak found, put together: the loops' records, the tokens' intervals, the
//! memory readings and the processes' counters.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokengate_tests::harness::Companion;

use super::churn::Rotation;
use super::load::LoopRecord;
use super::{
    EARLY_TOLERANCE, Extra, Failure, Injected, LogLines, MemoryRow, MemorySample, Minute, SETTLE,
    Settings, Tokens,
};
use crate::stats::{Latencies, micros};

/// The filter's counters (`tokengate.*`) from an Envoy's admin `/stats`.
pub async fn envoy_counters(admin_port: u16) -> BTreeMap<String, u64> {
    let url = format!("http://127.0.0.1:{admin_port}/stats?filter=tokengate");
    let text = match reqwest::get(&url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let name = name.strip_prefix("wasmcustom.").unwrap_or(name);
            if !name.starts_with("tokengate.") {
                return None;
            }
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A companion's lease outcomes and Redis health transitions from `/metrics`.
pub async fn companion_counters(companion: &Companion) -> BTreeMap<String, u64> {
    let url = format!("http://127.0.0.1:{}/metrics", companion.port);
    let text = match reqwest::get(&url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|line| {
            line.starts_with("tokengate_companion_leases_total{")
                || line.starts_with("tokengate_companion_redis_health_transitions_total{")
        })
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

pub fn add_counters(total: &mut BTreeMap<String, u64>, more: &BTreeMap<String, u64>) {
    for (name, value) in more {
        *total.entry(name.clone()).or_default() += value;
    }
}

/// The loops' records together.
pub struct Merged {
    /// Per minute.
    pub minutes: Vec<Minute>,
    /// Every failure, classified.
    pub failures: Vec<Failure>,
    /// Slow requests: when, and how long (microseconds).
    pub slow: Vec<(Duration, u64)>,
    /// Requests sent.
    pub requests: u64,
}

/// Folds the loops' records into minutes, failures (classified) and slow requests.
/// `first_token` tells when a tenant's first token was issued (after the start of the
/// load; zero for the warm-up's): a tenant without one has no token to serve yet.
pub fn merge(
    records: Vec<LoopRecord>,
    faults: &[Injected],
    first_token: impl Fn(&str) -> Option<Duration>,
) -> Merged {
    let mut per_minute: Vec<Vec<u64>> = Vec::new();
    let mut failures = Vec::new();
    let mut slow = Vec::new();
    let mut requests = 0;
    for record in records {
        requests += record.sent;
        if per_minute.len() < record.per_minute.len() {
            per_minute.resize(record.per_minute.len(), Vec::new());
        }
        for (minute, latencies) in record.per_minute.into_iter().enumerate() {
            per_minute[minute].extend(latencies);
        }
        failures.extend(record.failures);
        slow.extend(record.slow);
    }
    for failure in &mut failures {
        let without_token = first_token(&failure.tenant).is_none_or(|first| first > failure.at);
        failure.expected = faults.iter().any(|fault| {
            let code = failure.code.as_str();
            fault.covers(failure.at)
                && (fault.kind.expected_codes().contains(&code)
                    || without_token && fault.kind.expected_codes_without_token().contains(&code))
        });
    }
    failures.sort_by_key(|f| f.at);
    slow.sort_unstable();
    let minutes = per_minute
        .iter()
        .enumerate()
        .map(|(index, latencies)| {
            let range =
                Duration::from_secs(index as u64 * 60)..Duration::from_secs(index as u64 * 60 + 60);
            Minute {
                latency: Latencies::of(latencies),
                failures: failures.iter().filter(|f| range.contains(&f.at)).count(),
                faults: faults
                    .iter()
                    .filter(|f| range.contains(&f.at))
                    .map(|f| f.kind)
                    .collect(),
            }
        })
        .collect();
    Merged {
        minutes,
        failures,
        slow,
        requests,
    }
}

/// Classifies each tenant's tokens. A token succeeds the newest earlier one that has
/// reached the start of its refresh window (the earliest its refresh may begin: the
/// moment itself is jittered over the window's first half) and has no successor yet
/// (older ones without a successor are superseded then: after two Envoys fetched in
/// parallel, the next refresh of either one is no extra call); a token with no such
/// predecessor is an extra call.
///
/// Churn: a tenant's first token (the warm-up's, or the one its first request fetched
/// when it joined) is its generation 0 and succeeds nothing. After a tenant left nothing
/// is expected of it; a token issued more than [`SETTLE`] after it left is one no request
/// asked for. `times[n]` are the issue times of tenant `n` of the rotation.
pub fn analyse_tokens(
    times: &[Vec<Instant>],
    tenants: &[String],
    rotation: Rotation,
    epoch: Instant,
    duration: Duration,
    faults: &[Injected],
) -> Tokens {
    let window_start = Settings::refresh_window_start();
    let served_for = Settings::served_for();
    let mut tokens = Tokens::default();
    let mut intervals = Vec::new();
    for (n, (tenant, issued)) in tenants.iter().zip(times).enumerate() {
        let joins = rotation.joins(n);
        if joins < duration {
            let leaves = rotation.leaves(n).map_or(duration, |at| at.min(duration));
            tokens.active_time += leaves.saturating_sub(joins);
            tokens
                .per_tenant
                .push(issued.iter().filter(|at| **at >= epoch).count());
        }
        tokens.tenants_seen += usize::from(!issued.is_empty());
        // Tokens without a successor yet, oldest first.
        let mut open: Vec<Instant> = Vec::new();
        for (index, issued_at) in issued.iter().enumerate() {
            let at = issued_at.saturating_duration_since(epoch);
            if rotation.leaves(n).is_some_and(|left| at > left + SETTLE) {
                tokens.after_leaving.push((at, tenant.clone()));
                continue;
            }
            let predecessor = open
                .iter()
                .rposition(|earlier| *earlier + window_start <= *issued_at + EARLY_TOLERANCE);
            match predecessor {
                Some(position) => {
                    let after = issued_at.duration_since(open[position]);
                    intervals.push(micros(after));
                    if after > served_for + EARLY_TOLERANCE {
                        tokens.late.push(at);
                    } else {
                        tokens.on_time += 1;
                    }
                    open.drain(..=position);
                }
                None if index > 0 => {
                    // The latest fault whose wake covers it.
                    let fault = faults.iter().rposition(|fault| {
                        fault.covers(at) && fault.kind.extra_tokens_reason().is_some()
                    });
                    tokens.extras.push(Extra {
                        at,
                        tenant: tenant.clone(),
                        after: issued_at.duration_since(issued[index - 1]),
                        fault,
                    });
                }
                None => {}
            }
            open.push(*issued_at);
        }
    }
    tokens.intervals = Latencies::of(&intervals);
    tokens.extras.sort_by_key(|e| e.at);
    tokens.late.sort_unstable();
    tokens.after_leaving.sort();
    tokens
}

/// Groups the readings by process instance and finds each one's baseline.
pub fn memory_rows(samples: &[MemorySample], warmup: Duration) -> Vec<MemoryRow> {
    let mut rows: Vec<MemoryRow> = Vec::new();
    for sample in samples {
        let reading = (sample.at, sample.rss_kib);
        match rows
            .iter_mut()
            .find(|row| row.process == sample.process && row.pid == sample.pid)
        {
            Some(row) => {
                row.max_kib = row.max_kib.max(sample.rss_kib);
                row.last = reading;
            }
            None => rows.push(MemoryRow {
                process: sample.process.clone(),
                pid: sample.pid,
                first: reading,
                max_kib: sample.rss_kib,
                last: reading,
                baseline: None,
            }),
        }
    }
    for row in &mut rows {
        // Processes started before the load have their first reading at 0.
        let from = row.first.0 + warmup;
        row.baseline = samples
            .iter()
            .filter(|s| s.process == row.process && s.pid == row.pid && s.at >= from)
            .map(|s| (s.at, s.rss_kib))
            .next()
            .filter(|(at, _)| *at < row.last.0);
    }
    rows.sort_by(|a, b| a.process.cmp(&b.process).then(a.first.0.cmp(&b.first.0)));
    rows
}

/// Warn and error lines of the Envoy and companion logs in `dir`, grouped by process
/// kind, level and message; the most frequent first.
pub fn log_warnings(dir: &Path) -> Vec<LogLines> {
    let mut groups: BTreeMap<(&'static str, &'static str, String), usize> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let process = if name.starts_with("envoy-") {
            "Envoy"
        } else if name.starts_with("companion-") {
            "companion"
        } else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for (level, message) in text.lines().filter_map(warning) {
            *groups.entry((process, level, message)).or_default() += 1;
        }
    }
    let mut lines: Vec<LogLines> = groups
        .into_iter()
        .map(|((process, level, message), count)| LogLines {
            process,
            level,
            message,
            count,
        })
        .collect();
    lines.sort_by_key(|lines| std::cmp::Reverse(lines.count));
    lines
}

/// A log line's level and message, if it is a warning or an error, with what varies
/// between repeats taken out: the companion's request span and fields, numbers.
/// Envoy: `[date][thread][level][logger] [file:line] message`; the companion:
/// `<time>  LEVEL [span: ]target: message key=value ...`.
fn warning(line: &str) -> Option<(&'static str, String)> {
    if line.starts_with('[') {
        let level = if line.contains("][warning][") {
            "warn"
        } else if line.contains("][error][") || line.contains("][critical][") {
            "error"
        } else {
            return None;
        };
        let (_, message) = line.split_once("] [")?.1.split_once("] ")?;
        return Some((level, without_numbers(message)));
    }
    let mut words = line.split_whitespace();
    let _time = words.next()?;
    let level = match words.next()? {
        "WARN" => "warn",
        "ERROR" => "error",
        _ => return None,
    };
    let rest = line
        .split_once(if level == "warn" { "WARN " } else { "ERROR " })?
        .1;
    let rest = match rest.strip_prefix("request{") {
        Some(span) => span.split_once("}: ")?.1,
        None => rest,
    };
    let message: Vec<&str> = rest
        .split(' ')
        .take_while(|word| !word.contains('='))
        .collect();
    Some((level, without_numbers(&message.join(" "))))
}

/// `text` with every run of digits replaced by `#`, then cut to 160 characters.
fn without_numbers(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out.chars().take(160).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::soak::{FaultKind, MEMORY_GROWTH_FLOOR_KIB as MEMORY_FLOOR};

    fn at(epoch: Instant, ms: u64) -> Instant {
        epoch + Duration::from_millis(ms)
    }

    /// One tenant throughout a 10-minute load.
    fn analyse(issued_ms: &[u64], faults: &[Injected]) -> Tokens {
        let epoch = Instant::now();
        let times = vec![issued_ms.iter().map(|ms| at(epoch, *ms)).collect()];
        let rotation = Rotation {
            active: 1,
            every: Duration::ZERO,
        };
        let ten_minutes = Duration::from_secs(600);
        analyse_tokens(
            &times,
            &["acme".to_owned()],
            rotation,
            epoch,
            ten_minutes,
            faults,
        )
    }

    /// Tenants `bench-0`, `bench-1`, ... with these tokens, two active at once, one
    /// replaced every 20 s, in a load of a minute.
    fn analyse_churn(issued_ms: &[&[u64]]) -> Tokens {
        let epoch = Instant::now();
        let times: Vec<Vec<Instant>> = issued_ms
            .iter()
            .map(|tenant| tenant.iter().map(|ms| at(epoch, *ms)).collect())
            .collect();
        let names: Vec<String> = (0..times.len()).map(|n| format!("bench-{n}")).collect();
        let rotation = Rotation {
            active: 2,
            every: Duration::from_secs(20),
        };
        analyse_tokens(
            &times,
            &names,
            rotation,
            epoch,
            Duration::from_secs(60),
            &[],
        )
    }

    #[test]
    fn a_joining_tenant_s_first_token_is_its_generation_zero() {
        // bench-2 joins at 20 s, bench-3 at 40 s: their first tokens are no extra calls,
        // not even right after another tenant's.
        let tokens = analyse_churn(&[
            &[0, 6_000, 12_000],
            &[2_000, 8_000, 14_000, 20_000, 26_000, 32_000],
            &[20_050, 26_000, 32_000, 38_000, 44_000, 50_000],
            &[40_010, 46_000, 52_000, 58_000],
        ]);
        assert!(tokens.extras.is_empty(), "{:?}", tokens.extras);
        assert!(tokens.after_leaving.is_empty());
        assert_eq!(tokens.on_time, 2 + 5 + 5 + 3);
        assert_eq!(tokens.tenants_seen, 4);
        // In the active set: bench-0 from the start to 20 s, bench-1 to 40 s, bench-2
        // from 20 to 60 s, bench-3 from 40 s to the end at 60 s.
        assert_eq!(tokens.active_time, Duration::from_secs(20 + 40 + 40 + 20));
        // A second token right after a joiner's first is still an extra call.
        let parallel = analyse_churn(&[&[0], &[0], &[20_050, 20_100]]);
        assert_eq!(parallel.extras.len(), 1);
        assert_eq!(parallel.extras[0].tenant, "bench-2");
    }

    #[test]
    fn a_leaving_tenant_is_not_expected_to_refresh() {
        // bench-0 leaves at 20 s. A refresh its last requests started lands at 21.3 s
        // (on time); that token then has no successor, and none is missed or late.
        let tokens = analyse_churn(&[&[0, 7_000, 14_000, 21_300], &[0, 6_000]]);
        assert!(tokens.late.is_empty());
        assert!(tokens.extras.is_empty());
        assert!(tokens.after_leaving.is_empty());
        assert_eq!(tokens.on_time, 4);
        // Tokens for a tenant long gone are calls no request asked for.
        let ghost = analyse_churn(&[&[0, 6_000, 50_000], &[0]]);
        assert_eq!(
            ghost.after_leaving,
            [(Duration::from_secs(50), "bench-0".to_owned())]
        );
        assert!(ghost.late.is_empty(), "not a late successor either");
    }

    fn fault(kind: FaultKind, at_ms: u64) -> Injected {
        Injected {
            kind,
            at: Duration::from_millis(at_ms),
            ended: Duration::from_millis(at_ms) + kind.hold(),
            detail: String::new(),
        }
    }

    #[test]
    fn refreshes_on_the_refresh_moment_are_one_call_per_generation() {
        let tokens = analyse(&[0, 7_010, 14_030, 21_100], &[]);
        assert_eq!(tokens.on_time, 3);
        assert!(tokens.extras.is_empty());
        assert!(tokens.late.is_empty());
        assert_eq!(tokens.per_tenant, [4]);
    }

    #[test]
    fn a_token_before_the_refresh_moment_is_an_extra_call_explained_only_by_a_fault() {
        let tokens = analyse(&[0, 3_000], &[]);
        assert_eq!(tokens.extras.len(), 1);
        assert_eq!(tokens.extras[0].after, Duration::from_millis(3_000));
        assert_eq!(tokens.extras[0].fault, None);

        let slow_idp = analyse(&[0, 3_000], &[fault(FaultKind::IdpSlow, 2_000)]);
        assert_eq!(
            slow_idp.extras[0].fault, None,
            "a slow IdP explains no extra call"
        );
        let companion = analyse(&[0, 3_000], &[fault(FaultKind::CompanionKill, 2_000)]);
        assert_eq!(companion.extras[0].fault, Some(0));
        let long_after = analyse(&[0, 60_000, 63_000], &[fault(FaultKind::CompanionKill, 0)]);
        assert_eq!(long_after.extras[0].fault, None, "outside the fault's wake");
    }

    #[test]
    fn after_a_parallel_fetch_the_next_refresh_succeeds_either_token() {
        // Two Envoys fetched 50 ms apart (one extra call); then one refresh of the
        // newer token, then the usual cadence.
        let tokens = analyse(&[0, 7_000, 7_050, 14_060, 21_070], &[]);
        assert_eq!(tokens.extras.len(), 1);
        assert_eq!(tokens.extras[0].at, Duration::from_millis(7_050));
        assert_eq!(tokens.on_time, 3);
        // Parallel tokens that then both refresh are two chains: the second refresh is
        // a further extra call.
        let both = analyse(&[0, 50, 7_000, 7_050], &[]);
        assert_eq!(both.extras.len(), 2);
    }

    #[test]
    fn a_successor_after_the_end_of_service_is_late() {
        let tokens = analyse(&[0, 11_000], &[]);
        assert_eq!(tokens.late, [Duration::from_millis(11_000)]);
        assert!(tokens.extras.is_empty());
    }

    #[test]
    fn refreshes_anywhere_in_the_first_half_of_the_window_are_on_time() {
        // The window opens 5 s after issue; jitter puts the refresh between 5 and 7.5 s.
        let tokens = analyse(&[0, 5_020, 12_500, 17_600, 25_000], &[]);
        assert_eq!(tokens.on_time, 4);
        assert!(tokens.extras.is_empty());
        // Earlier than the window's start (with the tolerance) is an extra call.
        let early = analyse(&[0, 4_400], &[]);
        assert_eq!(early.extras.len(), 1);
    }

    #[test]
    fn allowances_cover_the_degraded_spell() {
        let period = Settings::refresh_window_start();
        assert_eq!(period, Duration::from_secs(5));
        assert_eq!(FaultKind::IdpErrors.extra_tokens_allowed(period), 0);
        // 5 s down + 5 s of local mode: two refreshes at least 5 s apart can fall in it.
        assert_eq!(FaultKind::CompanionKill.extra_tokens_allowed(period), 2);
        assert_eq!(FaultKind::RedisRestart.extra_tokens_allowed(period), 2);
    }

    fn sample(at_secs: u64, process: &str, pid: u32, rss_kib: u64) -> MemorySample {
        MemorySample {
            at: Duration::from_secs(at_secs),
            process: process.to_owned(),
            pid,
            rss_kib,
        }
    }

    #[test]
    fn memory_growth_is_measured_from_the_end_of_each_process_warm_up() {
        let samples = [
            sample(0, "envoy 0", 10, 90_000),
            sample(0, "companion 0", 20, 15_000),
            sample(120, "envoy 0", 10, 100_000),
            sample(120, "companion 0", 20, 16_000),
            sample(300, "companion 0", 21, 15_000),
            sample(420, "companion 0", 21, 18_000),
            sample(600, "envoy 0", 10, 104_000),
            sample(600, "companion 0", 21, 22_000),
        ];
        let rows = memory_rows(&samples, Duration::from_secs(120));
        let envoy = rows.iter().find(|r| r.pid == 10).expect("envoy");
        assert_eq!(envoy.baseline, Some((Duration::from_secs(120), 100_000)));
        assert_eq!(envoy.growth_kib(), Some(4_000));
        assert_eq!(envoy.bound_kib(), Some(5_000));
        assert!(envoy.within());
        // The restarted companion is judged from 2 minutes after its own start.
        let restarted = rows.iter().find(|r| r.pid == 21).expect("restarted");
        assert_eq!(restarted.baseline, Some((Duration::from_secs(420), 18_000)));
        assert_eq!(restarted.growth_kib(), Some(4_000));
        assert_eq!(restarted.bound_kib(), Some(MEMORY_FLOOR));
        assert!(restarted.within());
        // The first companion lived until 2:00 only: too short to judge.
        let first = rows.iter().find(|r| r.pid == 20).expect("first");
        assert_eq!(first.baseline, None);
        assert!(first.within());
    }

    #[test]
    fn only_errors_the_fault_under_way_documents_are_expected() {
        let failure = |at_ms: u64, code: &str| Failure {
            at: Duration::from_millis(at_ms),
            status: 503,
            code: code.to_owned(),
            tenant: "acme".to_owned(),
            expected: false,
        };
        let record = LoopRecord {
            per_minute: vec![vec![1_000; 3], vec![2_000]],
            failures: vec![
                failure(61_000, "CACHE_UNAVAILABLE"),
                failure(61_500, "COMPANION_UNAVAILABLE"),
                failure(200_000, "CACHE_UNAVAILABLE"),
            ],
            slow: Vec::new(),
            sent: 7,
        };
        let merged = merge(
            vec![record],
            &[fault(FaultKind::RedisPause, 60_000)],
            |_| Some(Duration::ZERO),
        );
        let expected: Vec<bool> = merged.failures.iter().map(|f| f.expected).collect();
        assert_eq!(expected, [true, false, false]);
        assert_eq!(merged.requests, 7);
        assert_eq!(merged.minutes.len(), 2);
        assert_eq!(merged.minutes[1].failures, 2);
        assert_eq!(merged.minutes[1].faults, [FaultKind::RedisPause]);
    }

    #[test]
    fn an_idp_burst_may_fail_only_a_tenant_without_a_token_yet() {
        let failure = |tenant: &str| Failure {
            at: Duration::from_millis(61_000),
            status: 502,
            code: "OAUTH_EXCHANGE_FAILED".to_owned(),
            tenant: tenant.to_owned(),
            expected: false,
        };
        let record = LoopRecord {
            per_minute: Vec::new(),
            failures: vec![failure("bench-0"), failure("bench-30"), failure("bench-31")],
            slow: Vec::new(),
            sent: 3,
        };
        // bench-0 has had tokens since the warm-up; bench-30 joined at 60 s and got its
        // first token only after the burst; bench-31 never got one.
        let first_token = |tenant: &str| match tenant {
            "bench-0" => Some(Duration::ZERO),
            "bench-30" => Some(Duration::from_millis(63_000)),
            _ => None,
        };
        let merged = merge(
            vec![record],
            &[fault(FaultKind::IdpErrors, 60_000)],
            first_token,
        );
        let expected: Vec<(&str, bool)> = merged
            .failures
            .iter()
            .map(|f| (f.tenant.as_str(), f.expected))
            .collect();
        assert_eq!(
            expected,
            [("bench-0", false), ("bench-30", true), ("bench-31", true)]
        );
    }

    #[test]
    fn warnings_group_without_their_varying_parts() {
        let envoy = "[2026-11-22 21:18:17.455][21221][warning][wasm] [source/extensions/common/wasm/context.cc:1154] wasm log tokengate tokengate: fetch for genesys:bench-7 backs off 500 ms: login answered 503";
        assert_eq!(
            warning(envoy),
            Some((
                "warn",
                "wasm log tokengate tokengate: fetch for genesys:bench-# backs off # ms: login answered #".to_owned()
            ))
        );
        let companion = "2026-11-22T21:17:24.511542Z  WARN request{request_id=fabd0986 method=POST path=/v1/lease}: tokengate_companion::lease: lease provider=\"genesys\" tenant=\"bench-3\" outcome=\"error\"";
        assert_eq!(
            warning(companion),
            Some(("warn", "tokengate_companion::lease: lease".to_owned()))
        );
        let plain = "2026-11-22T21:17:24.511542Z  WARN tokengate_companion::waits: commit notifications lost; waiters fall back reason=\"ping failed\"";
        assert_eq!(
            warning(plain),
            Some((
                "warn",
                "tokengate_companion::waits: commit notifications lost; waiters fall back"
                    .to_owned()
            ))
        );
        assert_eq!(
            warning("2026-11-22T21:17:24.511542Z  INFO tokengate_companion: listening"),
            None
        );
        assert_eq!(
            warning("[2026-11-22 21:18:17.455][1][info][main] [a.cc:1] up"),
            None
        );
    }

    #[test]
    fn growth_beyond_the_bound_is_caught() {
        let samples = [
            sample(0, "envoy 1", 7, 100_000),
            sample(120, "envoy 1", 7, 100_000),
            sample(600, "envoy 1", 7, 106_000),
        ];
        let rows = memory_rows(&samples, Duration::from_secs(120));
        assert!(!rows[0].within());
    }
}
