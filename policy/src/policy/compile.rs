//! Compiling a policy from its config: schedules, default, load thresholds, validated with key paths and warnings.

use super::*;

impl Policy {
    /// Validates a worker's availability config. `system_tz` applies when
    /// `timezone` is unset. Reports every problem at once.
    pub fn compile(
        cfg: &AvailabilityConfig,
        system_tz: TimeZone,
    ) -> Result<Policy, Vec<PolicyError>> {
        Policy::compile_with(cfg, system_tz, &CompileOptions::default())
    }

    /// Validates a master-side schedule for a worker: its presences carry
    /// [`Source::Master`]; `path` locates errors (e.g. `worker[2].availability`).
    pub fn compile_for_master(
        cfg: &AvailabilityConfig,
        system_tz: TimeZone,
        path: &str,
    ) -> Result<Policy, Vec<PolicyError>> {
        Policy::compile_with(
            cfg,
            system_tz,
            &CompileOptions {
                path: path.to_owned(),
                owner: PolicyOwner::Master,
                ..CompileOptions::default()
            },
        )
    }

    /// Validates with explicit options.
    pub fn compile_with(
        cfg: &AvailabilityConfig,
        system_tz: TimeZone,
        options: &CompileOptions,
    ) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let at = |key: &str, message: String| PolicyError {
            path: options.key_path(key),
            message,
        };

        let (tz, zone_name) = match &cfg.timezone {
            Some(name) => match TimeZone::get(name) {
                Ok(tz) => (tz, name.clone()),
                Err(_) => {
                    errors.push(at(
                        "timezone",
                        format!(
                            "unknown time zone \"{name}\", expected an IANA name such as \"Europe/Berlin\" or \"UTC\""
                        ),
                    ));
                    (TimeZone::UTC, name.clone())
                }
            },
            None => {
                let name = system_tz.iana_name().unwrap_or("local time").to_owned();
                (system_tz, name)
            }
        };

        if cfg.default == Some(PresenceState::Offline) {
            errors.push(at(
                "default",
                "`offline` means not connected and cannot be chosen; use `away` to take no builds"
                    .to_owned(),
            ));
        }

        let mut windows = Vec::new();
        for (index, entry) in cfg.schedule.iter().enumerate() {
            let key = |field: &str| format!("schedule[{index}].{field}");
            let mut entry_ok = true;
            let name = entry.name.trim();
            if name.is_empty() {
                errors.push(at(
                    &key("name"),
                    "a schedule needs a non-empty name".to_owned(),
                ));
                entry_ok = false;
            } else if name.chars().any(|c| c.is_control()) {
                errors.push(at(
                    &key("name"),
                    format!("schedule name {name:?} has control characters"),
                ));
                entry_ok = false;
            } else if cfg.schedule[..index]
                .iter()
                .any(|other| other.name.trim() == name)
            {
                errors.push(at(
                    &key("name"),
                    format!("schedule name \"{name}\" is used twice; names must be unique"),
                ));
                entry_ok = false;
            }
            if entry.state == PresenceState::Offline {
                errors.push(at(
                    &key("state"),
                    "`offline` means not connected and cannot be scheduled; use `away`".to_owned(),
                ));
                entry_ok = false;
            }
            let window = match (&entry.hours, &entry.open, &entry.close) {
                (Some(hours), None, None) => {
                    let hours = parse_hours(hours).map_err(|m| errors.push(at(&key("hours"), m)));
                    let days = match &entry.days {
                        Some(days) => {
                            DaySet::parse(days).map_err(|m| errors.push(at(&key("days"), m)))
                        }
                        None => Ok(DaySet::ALL),
                    };
                    match (hours, days) {
                        (Ok((open, close)), Ok(days)) => {
                            Window::from_hours(name.to_owned(), entry.state, open, close, days)
                                .map_err(|m| errors.push(at(&key("hours"), m)))
                                .ok()
                        }
                        _ => None,
                    }
                }
                (None, Some(open), Some(close)) => {
                    if entry.days.is_some() {
                        errors.push(at(
                            &key("days"),
                            "`days` goes with `hours`; with `open`/`close` put the days in the cron day-of-week field".to_owned(),
                        ));
                    }
                    for (field, text) in [("open", open), ("close", close)] {
                        if let Some(message) = crontab_reading_differs(text) {
                            warnings.push(at(&key(field), message));
                        }
                    }
                    let open_cron = parse_cron(open).map_err(|m| errors.push(at(&key("open"), m)));
                    let close_cron =
                        parse_cron(close).map_err(|m| errors.push(at(&key("close"), m)));
                    match (open_cron, close_cron) {
                        (Ok(open_cron), Ok(close_cron)) => {
                            let mut fires = true;
                            for (field, cron, text) in
                                [("open", &open_cron, open), ("close", &close_cron, close)]
                            {
                                if Window::never_fires(cron, &tz) {
                                    errors.push(at(
                                        &key(field),
                                        format!("cron expression \"{text}\" never fires"),
                                    ));
                                    fires = false;
                                }
                            }
                            let pair = fires.then(|| CronPair::new(open_cron, close_cron));
                            match pair {
                                Some(pair) if !pair.lone_open && !pair.lone_close => {
                                    errors.push(at(
                                        &key("close"),
                                        format!(
                                            "open = \"{open}\" and close = \"{close}\" fire at the same times, so the window never opens; make close fire when the window should end (for a window that is always open, set `default` instead)"
                                        ),
                                    ));
                                    None
                                }
                                Some(pair) => {
                                    if !pair.lone_open {
                                        warnings.push(at(
                                            &key("open"),
                                            format!(
                                                "every time open = \"{open}\" fires, close = \"{close}\" fires too, so this window never opens"
                                            ),
                                        ));
                                    }
                                    Some(Window::from_cron(
                                        name.to_owned(),
                                        entry.state,
                                        pair,
                                        open.clone(),
                                        close.clone(),
                                    ))
                                }
                                None => None,
                            }
                        }
                        _ => None,
                    }
                }
                (Some(_), _, _) => {
                    let extra = if entry.open.is_some() {
                        "open"
                    } else {
                        "close"
                    };
                    errors.push(at(
                        &key(extra),
                        "give either `hours` (with optional `days`) or `open` and `close`, not both".to_owned(),
                    ));
                    None
                }
                (None, Some(_), None) => {
                    errors.push(at(
                        &key("close"),
                        "`open` needs a `close` cron expression too, e.g. close = \"0 7 * * *\""
                            .to_owned(),
                    ));
                    None
                }
                (None, None, Some(_)) => {
                    errors.push(at(
                        &key("open"),
                        "`close` needs an `open` cron expression too, e.g. open = \"0 19 * * *\""
                            .to_owned(),
                    ));
                    None
                }
                (None, None, None) => {
                    errors.push(at(
                        &key("hours"),
                        "a schedule needs `hours` (e.g. \"19:00-07:00\") or `open` and `close` cron expressions".to_owned(),
                    ));
                    None
                }
            };
            if let Some(window) = window
                && entry_ok
            {
                windows.push(window);
            }
        }

        if let Some(load) = &cfg.load {
            validate_load(load, &mut |key, message| {
                errors.push(at(&format!("load.{key}"), message))
            });
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        let default_explicit = cfg.default.is_some();
        let default =
            cfg.default
                .unwrap_or(if cfg.schedule.iter().any(|s| s.state.takes_builds()) {
                    PresenceState::Away
                } else {
                    PresenceState::Available
                });
        Ok(Policy {
            tz,
            zone_name,
            default,
            default_explicit,
            windows,
            load: cfg.load.clone(),
            owner: options.owner,
            warnings,
        })
    }
}

fn validate_load(load: &LoadConfig, report: &mut dyn FnMut(&str, String)) {
    if load.max_load1.is_none() && load.max_cpu_percent.is_none() {
        report(
            "max_load1",
            "the load section needs `max_load1` or `max_cpu_percent` (or both), e.g. max_load1 = 4.0".to_owned(),
        );
    }
    let checks = [
        ("max_load1", load.max_load1, 10_000.0),
        ("resume_load1", load.resume_load1, 10_000.0),
        ("max_cpu_percent", load.max_cpu_percent, 100.0),
        ("resume_cpu_percent", load.resume_cpu_percent, 100.0),
    ];
    for (key, value, max) in checks {
        if let Some(value) = value
            && !(value.is_finite() && (0.0..=max).contains(&value))
        {
            report(key, format!("{value} is out of range (0 to {max})"));
        }
    }
    for (resume_key, resume, max_key, max) in [
        (
            "resume_load1",
            load.resume_load1,
            "max_load1",
            load.max_load1,
        ),
        (
            "resume_cpu_percent",
            load.resume_cpu_percent,
            "max_cpu_percent",
            load.max_cpu_percent,
        ),
    ] {
        match (resume, max) {
            (Some(_), None) => report(resume_key, format!("`{resume_key}` needs `{max_key}`")),
            (Some(r), Some(m)) if r > m => report(
                resume_key,
                format!(
                    "{resume_key} = {r} is above {max_key} = {m}; the resume threshold must be at or below it"
                ),
            ),
            _ => {}
        }
    }
    if !matches!(load.state, PresenceState::Away | PresenceState::Reluctant) {
        report(
            "state",
            format!(
                "load can make the worker `away` or `reluctant`, not `{}`",
                load.state
            ),
        );
    }
    if load.sample_every.0 < SignedDuration::from_secs(1) {
        report(
            "sample_every",
            format!(
                "sample_every = \"{}\" is too short; use at least 1s",
                load.sample_every
            ),
        );
    }
}

pub(super) fn describe_load(load: &LoadConfig) -> String {
    let mut over = Vec::new();
    let mut under = Vec::new();
    if let Some(max) = load.max_load1 {
        over.push(format!("1-minute load > {max}"));
        under.push(format!("load ≤ {}", load.resume_load1.unwrap_or(max)));
    }
    if let Some(max) = load.max_cpu_percent {
        over.push(format!("CPU > {max}%"));
        under.push(format!("CPU ≤ {}%", load.resume_cpu_percent.unwrap_or(max)));
    }
    let hold = format_duration(load.hold.0);
    format!(
        "load: {} when {} for {hold} (not counting own builds); back when {} for {hold}; sampled every {}",
        load.state,
        over.join(" or "),
        under.join(" and "),
        load.sample_every
    )
}
