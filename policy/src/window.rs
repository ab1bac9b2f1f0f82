//! Schedule windows: `hours`/`days` and cron `open`/`close` forms compiled into one
//! open/close cron pair, and the membership and boundary questions asked of them.

use std::fmt;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

use crate::firing::CronPair;
pub(crate) use crate::firing::Membership;
use crate::state::PresenceState;

const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const FULL_DAY_NAMES: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];
const FIELD_NAMES: [&str; 5] = [
    "minute (1st field, 0-59)",
    "hour (2nd field, 0-23)",
    "day-of-month (3rd field, 1-31)",
    "month (4th field, 1-12 or jan-dec)",
    "day-of-week (5th field, 0-7 or sun-sat)",
];

/// A set of weekdays, bit `d` set for day `d` (0 = Sunday, as cron numbers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DaySet(u8);

impl DaySet {
    pub(crate) const ALL: DaySet = DaySet(0x7f);

    fn contains(self, day: usize) -> bool {
        self.0 & (1 << day) != 0
    }

    /// The days after these (a window opening on Friday night closes on Saturday).
    fn next_days(self) -> DaySet {
        let mut out = 0u8;
        for day in 0..7 {
            if self.contains(day) {
                out |= 1 << ((day + 1) % 7);
            }
        }
        DaySet(out)
    }

    fn cron_field(self) -> String {
        if self == DaySet::ALL {
            return "*".to_owned();
        }
        (0..7)
            .filter(|&day| self.contains(day))
            .map(|day| day.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses `mon-fri`, `sat,sun`, `mon,wed-fri`, `fri-mon` (wrapping), `monday`,
    /// `weekdays`, `weekends`, `daily`.
    pub(crate) fn parse(text: &str) -> Result<DaySet, String> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "" => return Err("empty `days`, expected e.g. \"mon-fri\" or \"sat,sun\"".to_owned()),
            "daily" | "every day" | "all" | "*" => return Ok(DaySet::ALL),
            "weekdays" => return Ok(DaySet(0b0111110)),
            "weekends" | "weekend" => return Ok(DaySet(0b1000001)),
            _ => {}
        }
        let mut set = 0u8;
        for part in lower.split([',', ' ']).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((from, to)) => {
                    let from = parse_day(from)?;
                    let to = parse_day(to)?;
                    let mut day = from;
                    loop {
                        set |= 1 << day;
                        if day == to {
                            break;
                        }
                        day = (day + 1) % 7;
                    }
                }
                None => set |= 1 << parse_day(part)?,
            }
        }
        if set == 0 {
            return Err(format!(
                "no day in `days = \"{text}\"`, expected e.g. \"mon-fri\""
            ));
        }
        Ok(DaySet(set))
    }
}

impl fmt::Display for DaySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0x7f => return f.write_str("every day"),
            0b0111110 => return f.write_str("mon–fri"),
            0b1000001 => return f.write_str("sat, sun"),
            _ => {}
        }
        // Monday-first runs, e.g. `mon–wed, fri`.
        let order = [1usize, 2, 3, 4, 5, 6, 0];
        let mut parts = Vec::new();
        let mut i = 0;
        while i < 7 {
            if !self.contains(order[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i + 1 < 7 && self.contains(order[i + 1]) {
                i += 1;
            }
            parts.push(match i - start {
                0 => DAY_NAMES[order[start]].to_owned(),
                1 => format!("{}, {}", DAY_NAMES[order[start]], DAY_NAMES[order[i]]),
                _ => format!("{}–{}", DAY_NAMES[order[start]], DAY_NAMES[order[i]]),
            });
            i += 1;
        }
        f.write_str(&parts.join(", "))
    }
}

fn parse_day(text: &str) -> Result<usize, String> {
    let text = text.trim();
    DAY_NAMES
        .iter()
        .position(|name| *name == text)
        .or_else(|| FULL_DAY_NAMES.iter().position(|name| *name == text))
        .ok_or_else(|| format!("unknown day \"{text}\", expected mon..sun"))
}

/// A time of day as written in `hours`, in minutes after midnight (`24:00` = 1440).
fn parse_clock(text: &str, whole: &str) -> Result<u32, String> {
    let text = text.trim();
    let (hour, minute) = match text.split_once(':') {
        Some((h, m)) => (h, m),
        None => (text, "0"),
    };
    let bad = || {
        format!(
            "invalid time \"{text}\" in hours = \"{whole}\", expected HH:MM-HH:MM such as \"19:00-07:00\""
        )
    };
    let digits = |part: &str| {
        !part.is_empty() && part.len() <= 2 && part.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(hour) || !digits(minute) {
        return Err(bad());
    }
    let hour: u32 = hour.parse().map_err(|_| bad())?;
    let minute: u32 = minute.parse().map_err(|_| bad())?;
    if minute > 59 || hour > 24 || (hour == 24 && minute != 0) {
        return Err(format!(
            "time \"{text}\" in hours = \"{whole}\" is out of range (00:00 to 24:00)"
        ));
    }
    Ok(hour * 60 + minute)
}

/// Parses `hours = "19:00-07:00"` into (open, close) minutes after midnight.
pub(crate) fn parse_hours(text: &str) -> Result<(u32, u32), String> {
    let separators = ['-', '–'];
    let Some((start, end)) = text.split_once(separators) else {
        return Err(format!(
            "invalid hours = \"{text}\", expected HH:MM-HH:MM such as \"19:00-07:00\""
        ));
    };
    let start = parse_clock(start, text)?;
    let end = parse_clock(end, text)?;
    if start == 1440 {
        return Err(format!("hours = \"{text}\" opens at 24:00; write 00:00"));
    }
    if start == end {
        return Err(format!(
            "hours = \"{text}\" opens and closes at the same time; for a whole day write \"00:00-24:00\""
        ));
    }
    Ok((start, end))
}

fn clock_text(minutes: u32) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

/// Parses a 5-field cron expression, naming the field that is wrong.
pub(crate) fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if expr.trim_start().starts_with('@') {
        return parser()
            .parse(expr)
            .map_err(|e| format!("invalid cron expression \"{expr}\": {e}"));
    }
    if fields.len() != 5 {
        return Err(format!(
            "cron expression \"{expr}\" has {} field{}, expected 5: minute hour day-of-month month day-of-week, e.g. \"0 19 * * mon-fri\"",
            fields.len(),
            if fields.len() == 1 { "" } else { "s" }
        ));
    }
    for (index, field) in fields.iter().enumerate() {
        check_field_words(expr, index, field)?;
    }
    match parser().parse(expr) {
        Ok(cron) => Ok(cron),
        Err(error) => {
            for (index, field) in fields.iter().enumerate() {
                let mut probe = ["*"; 5];
                probe[index] = field;
                if let Err(field_error) = parser().parse(&probe.join(" ")) {
                    return Err(format!(
                        "cron expression \"{expr}\": the {} `{field}` is invalid ({})",
                        FIELD_NAMES[index],
                        croner_message(&field_error)
                    ));
                }
            }
            Err(format!(
                "invalid cron expression \"{expr}\" ({})",
                croner_message(&error)
            ))
        }
    }
}

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// Names belong in their own field only: month names in the month field, day
/// names in the day-of-week field (croner would read `mon` in the month field
/// as January, `dec` in the day-of-month field as 12). Also allowed are `L`
/// and `W` in day-of-month and `L` in day-of-week.
fn check_field_words(expr: &str, index: usize, field: &str) -> Result<(), String> {
    let lower = field.to_ascii_lowercase();
    for word in lower
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
    {
        let is_month = MONTH_NAMES.contains(&word);
        let is_day = DAY_NAMES.contains(&word);
        let allowed = match index {
            2 => matches!(word, "l" | "w" | "lw"),
            3 => is_month,
            4 => is_day || word == "l",
            _ => false,
        };
        if allowed {
            continue;
        }
        let what = if is_day {
            format!("`{word}` is a day name, which belongs in the day-of-week (5th) field")
        } else if is_month {
            format!("`{word}` is a month name, which belongs in the month (4th) field")
        } else {
            format!("`{word}` is not a value of this field")
        };
        return Err(format!(
            "cron expression \"{expr}\": the {} `{field}` is invalid ({what})",
            FIELD_NAMES[index]
        ));
    }
    Ok(())
}

/// Where nightshift's reading of a cron expression differs from Linux
/// crontab's (Vixie/cronie): a day-of-month or day-of-week that starts with
/// `*` but is not `*` (e.g. `*/2`) beside a restricted other day field.
/// nightshift fires on days matching either field (POSIX, croner); crontab
/// fires only on days matching both. `None` where the readings agree.
pub(crate) fn crontab_reading_differs(expr: &str) -> Option<String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let [_, _, dom, _, dow] = fields.as_slice() else {
        return None;
    };
    let is_star = |f: &str| f == "*" || f == "?";
    let starred_step = |f: &str| f.starts_with('*') && !is_star(f);
    if dow.starts_with('+') {
        return None;
    }
    let (starred, other) = if starred_step(dom) && !is_star(dow) {
        (
            format!("day-of-month `{dom}`"),
            format!("day-of-week `{dow}`"),
        )
    } else if starred_step(dow) && !is_star(dom) {
        (
            format!("day-of-week `{dow}`"),
            format!("day-of-month `{dom}`"),
        )
    } else {
        return None;
    };
    Some(format!(
        "cron expression \"{expr}\": the {starred} and the {other} are both restricted, so it fires on days that match either (as POSIX cron and croner read it); Linux crontab would fire only on days that match both. To require both, start the day-of-week with `+` (e.g. \"{}\")",
        fields[..4]
            .iter()
            .copied()
            .chain([format!("+{dow}").as_str()])
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

fn croner_message(error: &croner::errors::CronError) -> String {
    let text = error.to_string();
    let text = text
        .strip_prefix("Component error: ")
        .or_else(|| text.strip_prefix("Invalid pattern: "))
        .unwrap_or(&text);
    text.trim_end_matches('.').to_lowercase()
}

/// How a window was written, for describing it back to its owner.
#[derive(Debug, Clone)]
pub(crate) enum WindowForm {
    Hours { open: u32, close: u32, days: DaySet },
    Cron { open: String, close: String },
}

/// One compiled window: an open/close cron pair and the state it gives.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub name: String,
    pub state: PresenceState,
    pub form: WindowForm,
    pair: CronPair,
}

impl Window {
    pub(crate) fn from_hours(
        name: String,
        state: PresenceState,
        open: u32,
        close: u32,
        days: DaySet,
    ) -> Result<Window, String> {
        let crosses_midnight = close <= open || close == 1440;
        let close_days = if crosses_midnight {
            days.next_days()
        } else {
            days
        };
        let close_clock = close % 1440;
        let open_expr = format!("{} {} * * {}", open % 60, open / 60, days.cron_field());
        let close_expr = format!(
            "{} {} * * {}",
            close_clock % 60,
            close_clock / 60,
            close_days.cron_field()
        );
        Ok(Window {
            name,
            state,
            form: WindowForm::Hours { open, close, days },
            pair: CronPair::new(parse_cron(&open_expr)?, parse_cron(&close_expr)?),
        })
    }

    pub(crate) fn from_cron(
        name: String,
        state: PresenceState,
        pair: CronPair,
        open_text: String,
        close_text: String,
    ) -> Window {
        Window {
            name,
            state,
            form: WindowForm::Cron {
                open: open_text,
                close: close_text,
            },
            pair,
        }
    }

    /// Whether the window is open at `at`: its last lone open or close at or
    /// before `at` was an open. Where open and close fire at the same instant
    /// the window stays as it was just before (one window ends as the next
    /// begins, e.g. `00:00-24:00` on `sat,sun`; or an empty window, e.g. one
    /// that would open in a skipped DST hour and close at the gap's end),
    /// however many such instants follow each other.
    pub(crate) fn membership(&self, at: &Zoned) -> Membership {
        if self.always_open() {
            return Membership {
                inside: true,
                since: None,
            };
        }
        self.pair.membership(at.time_zone(), at.timestamp())
    }

    /// `hours = "00:00-24:00"` on every day: open throughout (its open and
    /// close crons are the same, every midnight a tie).
    fn always_open(&self) -> bool {
        matches!(
            self.form,
            WindowForm::Hours {
                open: 0,
                close: 1440,
                days: DaySet::ALL
            }
        )
    }

    /// The next instant strictly after `at` at which the window closes (if
    /// `inside`) or opens: where it changes, by the rule of [`Window::membership`].
    pub(crate) fn next_boundary(&self, at: &Zoned, inside: bool) -> Option<Timestamp> {
        if self.always_open() {
            return None;
        }
        self.pair
            .next_boundary(at.time_zone(), at.timestamp(), inside)
    }

    /// The instants in `(from, to)` where this window opens or closes, with
    /// whether it is open after each, given whether it is open at `from`.
    pub(crate) fn changes_between(
        &self,
        tz: &TimeZone,
        from: Timestamp,
        to: Timestamp,
        inside: bool,
        limit: usize,
    ) -> Vec<(Timestamp, bool)> {
        if self.always_open() {
            return Vec::new();
        }
        self.pair.changes_between(tz, from, to, inside, limit)
    }

    /// Whether both expressions ever fire (searching from 2000 in `tz`).
    pub(crate) fn never_fires(cron: &Cron, tz: &TimeZone) -> bool {
        let start = Timestamp::UNIX_EPOCH.to_zoned(tz.clone());
        cron.find_next_occurrence(&start, false).is_err()
    }

    /// `19:00–07:00 Europe/Berlin, every day` or the cron pair.
    pub(crate) fn describe_when(&self, zone_name: &str) -> String {
        match &self.form {
            WindowForm::Hours { open, close, days } => {
                let days_text = match *days {
                    DaySet::ALL => "every day".to_owned(),
                    days if close <= open => format!("nights starting {days}"),
                    days => days.to_string(),
                };
                if *open == 0 && *close == 1440 {
                    return format!("all day {zone_name}, {days_text}");
                }
                format!(
                    "{}–{} {zone_name}, {days_text}",
                    clock_text(*open),
                    clock_text(*close)
                )
            }
            WindowForm::Cron { open, close } => format!(
                "from \"{open}\" ({}) until \"{close}\" ({}), {zone_name}",
                lowercase_first(&self.pair.open.cron().describe()),
                lowercase_first(&self.pair.close.cron().describe())
            ),
        }
    }

    /// `19:00–07:00` or `cron "0 19 * * *"–"0 7 * * *"`: short, for reasons.
    pub(crate) fn short_when(&self) -> String {
        match &self.form {
            WindowForm::Hours { open, close, .. } => {
                format!("{}–{}", clock_text(*open), clock_text(*close))
            }
            WindowForm::Cron { open, close } => format!("\"{open}\" to \"{close}\""),
        }
    }
}

fn lowercase_first(text: &str) -> String {
    let text = text.trim().trim_end_matches('.');
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_parse_and_display() {
        assert_eq!(DaySet::parse("mon-fri").unwrap().cron_field(), "1,2,3,4,5");
        assert_eq!(DaySet::parse("fri-mon").unwrap().cron_field(), "0,1,5,6");
        assert_eq!(DaySet::parse("Sat, Sun").unwrap().to_string(), "sat, sun");
        assert_eq!(
            DaySet::parse("mon,wed-fri").unwrap().to_string(),
            "mon, wed–fri"
        );
        assert_eq!(DaySet::parse("mon-sun").unwrap(), DaySet::ALL);
        assert_eq!(
            DaySet::parse("mon-fri").unwrap().next_days().cron_field(),
            "2,3,4,5,6"
        );
        assert_eq!(
            DaySet::parse("mnd").unwrap_err(),
            "unknown day \"mnd\", expected mon..sun"
        );
    }

    #[test]
    fn hours_parse() {
        assert_eq!(parse_hours("19:00-07:00"), Ok((1140, 420)));
        assert_eq!(parse_hours("9-17"), Ok((540, 1020)));
        assert_eq!(parse_hours("7-19"), Ok((420, 1140)));
        assert_eq!(parse_hours("7:30 – 19"), Ok((450, 1140)));
        assert_eq!(parse_hours("00:00-24:00"), Ok((0, 1440)));
        for bad in [
            "19:00",
            "25:00-07:00",
            "19:60-07:00",
            "7:00-7:00",
            "ab-cd",
            "24:00-01:00",
            "+7:00-08:00",
            "7:00-+8:00",
            "-7:00-08:00",
            "7:0x-08:00",
        ] {
            let error = parse_hours(bad).unwrap_err();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn names_in_the_wrong_field_are_rejected() {
        for (expr, field, word) in [
            ("0 9 * mon *", "month (4th field", "`mon` is a day name"),
            (
                "0 9 * * jan",
                "day-of-week (5th field",
                "`jan` is a month name",
            ),
            ("mon 9 * * *", "minute (1st field", "`mon` is a day name"),
            ("0 sat * * *", "hour (2nd field", "`sat` is a day name"),
            (
                "0 9 dec * *",
                "day-of-month (3rd field",
                "`dec` is a month name",
            ),
            (
                "0 9 * * monday",
                "day-of-week (5th field",
                "`monday` is not a value",
            ),
        ] {
            let error = parse_cron(expr).unwrap_err();
            assert!(error.contains(field), "{expr}: {error}");
            assert!(error.contains(word), "{expr}: {error}");
            assert!(error.contains(&format!("\"{expr}\"")), "{expr}: {error}");
        }
        for good in [
            "0 9 * jan-mar mon-fri",
            "0 9 L * *",
            "0 9 15W * *",
            "0 9 * * 5L",
            "0 9 * DEC SUN",
        ] {
            assert!(parse_cron(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn crontab_differences_are_found() {
        let warning = crontab_reading_differs("0 9 */2 * mon").unwrap();
        assert!(warning.contains("either"), "{warning}");
        assert!(warning.contains("\"0 9 */2 * +mon\""), "{warning}");
        assert!(crontab_reading_differs("0 9 1 * */2").is_some());
        for same in [
            "0 9 */2 * *",
            "0 9 * * mon",
            "0 9 1-7 * mon",
            "0 9 */2 * +mon",
            "0 9 ? * */2",
        ] {
            assert_eq!(crontab_reading_differs(same), None, "{same}");
        }
    }

    #[test]
    fn cron_errors_name_the_field() {
        let error = parse_cron("0 25 * * *").unwrap_err();
        assert!(error.contains("hour (2nd field"), "{error}");
        assert!(error.contains("\"0 25 * * *\""), "{error}");
        let error = parse_cron("0 19 * * mnd").unwrap_err();
        assert!(error.contains("day-of-week"), "{error}");
        let error = parse_cron("0 0 19 * * *").unwrap_err();
        assert!(error.contains("6 fields, expected 5"), "{error}");
        assert!(parse_cron("0 19 * * mon-fri").is_ok());
    }
}
