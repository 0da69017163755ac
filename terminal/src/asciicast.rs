//! Session recordings in asciicast v2
//! (<https://docs.asciinema.org/manual/asciicast/v2/>): newline-delimited JSON, a header
//! object, then one `[seconds, code, data]` array per event: `o` output, `i` input, `r` resize
//! (`"COLSxROWS"`), `m` marker. Players ignore codes they do not know.
//!
//! [`Recorder`] writes into memory and hands the bytes out in chunks ([`Recorder::take_chunk`])
//! for the caller to hash and persist; every chunk ends at an event boundary. Event data is
//! UTF-8: a character split between two reads is kept whole (its first bytes wait for the next
//! event of the same stream), and bytes that are not UTF-8 become U+FFFD.
//!
//! [`Recording::parse`] reads a file back; [`play`] shows it in a terminal (speed, idle limit,
//! start at a marker).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the header of a recording says about the session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Terminal columns and rows at the start.
    pub width: u16,
    pub height: u16,
    /// Start of the session, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// The command of an exec session (none for a login shell).
    pub command: Option<String>,
    pub title: Option<String>,
    /// The client's `TERM` and the target's `SHELL`, as far as known.
    pub term: Option<String>,
    pub shell: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct HeaderJson {
    version: u8,
    width: u16,
    height: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duration: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idle_time_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
}

/// Writes one session's recording. Times are offsets from the start of the session; an event
/// never goes back in time (a clock step backwards is taken as no time passing).
#[derive(Debug)]
pub struct Recorder {
    buffer: Vec<u8>,
    last: Duration,
    /// The first bytes of a UTF-8 character the last output (input) ended in.
    output_carry: Vec<u8>,
    input_carry: Vec<u8>,
}

impl Recorder {
    /// A recording that starts with `header`.
    pub fn new(header: &Header) -> Recorder {
        let mut env = BTreeMap::new();
        if let Some(term) = &header.term {
            env.insert("TERM".to_owned(), term.clone());
        }
        if let Some(shell) = &header.shell {
            env.insert("SHELL".to_owned(), shell.clone());
        }
        let json = HeaderJson {
            version: 2,
            width: header.width,
            height: header.height,
            timestamp: header.timestamp,
            duration: None,
            idle_time_limit: None,
            command: header.command.clone(),
            title: header.title.clone(),
            env,
        };
        let mut buffer = serde_json::to_vec(&json).unwrap_or_else(|_| {
            // Unreachable: the header is strings and numbers. A minimal valid header instead.
            format!(
                "{{\"version\":2,\"width\":{},\"height\":{}}}",
                header.width, header.height
            )
            .into_bytes()
        });
        buffer.push(b'\n');
        Recorder {
            buffer,
            last: Duration::ZERO,
            output_carry: Vec::new(),
            input_carry: Vec::new(),
        }
    }

    /// Output the terminal showed at `at` (after masking).
    pub fn output(&mut self, at: Duration, bytes: &[u8]) {
        let text = decode(&mut self.output_carry, bytes, false);
        self.event(at, "o", &text);
    }

    /// Input the user typed at `at` (only when recording input is configured: it holds
    /// whatever was typed, passwords at prompts included).
    pub fn input(&mut self, at: Duration, bytes: &[u8]) {
        let text = decode(&mut self.input_carry, bytes, false);
        self.event(at, "i", &text);
    }

    /// The terminal was resized to `columns` x `rows`.
    pub fn resize(&mut self, at: Duration, columns: u16, rows: u16) {
        self.event(at, "r", &format!("{columns}x{rows}"));
    }

    /// A marker (a denied line, a policy decision) that a player can jump to.
    pub fn marker(&mut self, at: Duration, label: &str) {
        // An empty label is still a marker; asciinema shows markers by their label.
        self.event_always(at, "m", label);
    }

    /// The recorded bytes not taken yet: whole lines, ready to hash and persist.
    pub fn take_chunk(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// How many recorded bytes wait to be taken.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }

    /// The end of the session: the first bytes of a character that never completed are
    /// written as U+FFFD. Returns the last chunk.
    pub fn finish(&mut self, at: Duration) -> Vec<u8> {
        let output = decode(&mut self.output_carry, &[], true);
        self.event(at, "o", &output);
        let input = decode(&mut self.input_carry, &[], true);
        self.event(at, "i", &input);
        self.take_chunk()
    }

    fn event(&mut self, at: Duration, code: &str, data: &str) {
        if !data.is_empty() {
            self.event_always(at, code, data);
        }
    }

    fn event_always(&mut self, at: Duration, code: &str, data: &str) {
        self.last = self.last.max(at);
        let mut line = String::with_capacity(data.len() + 24);
        let _ = write!(
            line,
            "[{}.{:06}, \"{code}\", ",
            self.last.as_secs(),
            self.last.subsec_micros()
        );
        match serde_json::to_string(data) {
            Ok(json) => line.push_str(&json),
            // Unreachable: a string always serializes.
            Err(_) => line.push_str("\"\""),
        }
        line.push_str("]\n");
        self.buffer.extend_from_slice(line.as_bytes());
    }
}

/// `carry` and `bytes` as text: invalid bytes become U+FFFD; an incomplete character at the
/// end is carried to the next call unless `last`.
fn decode(carry: &mut Vec<u8>, bytes: &[u8], last: bool) -> String {
    let mut joined = std::mem::take(carry);
    joined.extend_from_slice(bytes);
    let mut text = String::with_capacity(joined.len());
    let mut rest = joined.as_slice();
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                break;
            }
            Err(error) => {
                let (valid, after) = rest.split_at(error.valid_up_to());
                // `valid` is UTF-8 up to `valid_up_to` by the error's own account.
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match error.error_len() {
                    Some(len) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        rest = after.get(len..).unwrap_or_default();
                    }
                    None if last => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        break;
                    }
                    None => {
                        // At most three bytes: the start of one character.
                        carry.extend_from_slice(after);
                        break;
                    }
                }
            }
        }
    }
    text
}

/// A recording read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub header: Header,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds from the start.
    pub time: f64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Output(String),
    Input(String),
    Resize {
        columns: u16,
        rows: u16,
    },
    Marker(String),
    /// A code this reader does not know; players skip it.
    Other {
        code: String,
        data: String,
    },
}

/// Why a recording could not be read; `line` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("line 1: not an asciicast v2 header: {0}")]
    Header(String),
    #[error("line 1: asciicast version {0}; only version 2 can be played")]
    Version(u8),
    #[error("line {line}: not an event `[seconds, code, data]`: {reason}")]
    Event { line: usize, reason: String },
}

impl Recording {
    pub fn parse(text: &str) -> Result<Recording, ReadError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, first) = lines
            .next()
            .ok_or_else(|| ReadError::Header("the file is empty".into()))?;
        let json: HeaderJson =
            serde_json::from_str(first).map_err(|e| ReadError::Header(e.to_string()))?;
        if json.version != 2 {
            return Err(ReadError::Version(json.version));
        }
        let header = Header {
            width: json.width,
            height: json.height,
            timestamp: json.timestamp,
            command: json.command,
            title: json.title,
            term: json.env.get("TERM").cloned(),
            shell: json.env.get("SHELL").cloned(),
        };
        let mut events = Vec::new();
        for (index, line) in lines {
            let line_number = index + 1;
            let bad = |reason: String| ReadError::Event {
                line: line_number,
                reason,
            };
            let (time, code, data): (f64, String, String) =
                serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            if !time.is_finite() || time < 0.0 {
                return Err(bad(format!("time {time} is not a time since the start")));
            }
            let kind = match code.as_str() {
                "o" => EventKind::Output(data),
                "i" => EventKind::Input(data),
                "m" => EventKind::Marker(data),
                "r" => {
                    let size = data
                        .split_once('x')
                        .and_then(|(c, r)| Some((c.trim().parse().ok()?, r.trim().parse().ok()?)));
                    let Some((columns, rows)) = size else {
                        return Err(bad(format!("resize `{data}` is not COLSxROWS")));
                    };
                    EventKind::Resize { columns, rows }
                }
                _ => EventKind::Other { code, data },
            };
            events.push(Event { time, kind });
        }
        Ok(Recording { header, events })
    }

    /// The labels of the markers, in order (`--marker N` counts from 1 in this list).
    pub fn markers(&self) -> impl Iterator<Item = (f64, &str)> {
        self.events.iter().filter_map(|e| match &e.kind {
            EventKind::Marker(label) => Some((e.time, label.as_str())),
            _ => None,
        })
    }
}

/// How to play a recording.
#[derive(Debug, Clone, PartialEq)]
pub struct PlayOptions {
    /// 2.0 plays twice as fast.
    pub speed: f64,
    /// Pauses longer than this (in recorded time) are shortened to it.
    pub idle_limit: Option<Duration>,
    /// Start at the Nth marker (from 1): what came before is drawn at once.
    pub marker: Option<usize>,
}

impl Default for PlayOptions {
    fn default() -> Self {
        PlayOptions {
            speed: 1.0,
            idle_limit: None,
            marker: None,
        }
    }
}

/// One step of playback: wait, then write.
#[derive(Debug, Clone, PartialEq)]
pub struct Step<'a> {
    pub wait: Duration,
    pub output: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    #[error("the recording has {have} marker(s); there is no marker {wanted}")]
    NoSuchMarker { wanted: usize, have: usize },
    #[error("speed {0} is not a positive number")]
    Speed(f64),
    #[error("writing to the terminal: {0}")]
    Write(#[from] std::io::Error),
}

/// The output of a recording as timed steps (pure; [`play`] sleeps and writes them).
pub fn steps<'a>(
    recording: &'a Recording,
    options: &PlayOptions,
) -> Result<Vec<Step<'a>>, PlayError> {
    if !(options.speed.is_finite() && options.speed > 0.0) {
        return Err(PlayError::Speed(options.speed));
    }
    let start = match options.marker {
        None => 0.0,
        Some(wanted) => {
            let have = recording.markers().count();
            let found = wanted
                .checked_sub(1)
                .and_then(|n| recording.markers().nth(n));
            match found {
                Some((time, _)) => time,
                None => return Err(PlayError::NoSuchMarker { wanted, have }),
            }
        }
    };
    let mut steps = Vec::new();
    let mut previous = 0.0_f64;
    for event in &recording.events {
        let EventKind::Output(output) = &event.kind else {
            continue;
        };
        let mut gap = if event.time <= start {
            0.0
        } else {
            event.time - previous.max(start)
        };
        gap = gap.max(0.0);
        if let Some(limit) = options.idle_limit {
            gap = gap.min(limit.as_secs_f64());
        }
        previous = previous.max(event.time);
        let wait = Duration::try_from_secs_f64(gap / options.speed).unwrap_or(Duration::ZERO);
        steps.push(Step {
            wait,
            output: output.as_str(),
        });
    }
    Ok(steps)
}

/// Play `recording` into `terminal` in real time (scaled by the options).
pub fn play(
    recording: &Recording,
    options: &PlayOptions,
    terminal: &mut impl Write,
) -> Result<(), PlayError> {
    play_with(recording, options, terminal, |wait| {
        std::thread::sleep(wait);
        true
    })
}

/// [`play`], with the waits between steps left to `wait`, which returns once that much
/// playback time has passed (a viewer's pause stops the clock) or false to stop playing.
pub fn play_with(
    recording: &Recording,
    options: &PlayOptions,
    terminal: &mut impl Write,
    mut wait: impl FnMut(Duration) -> bool,
) -> Result<(), PlayError> {
    for step in steps(recording, options)? {
        if !step.wait.is_zero() {
            terminal.flush()?;
            if !wait(step.wait) {
                break;
            }
        }
        terminal.write_all(step.output.as_bytes())?;
    }
    terminal.flush()?;
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn header() -> Header {
        Header {
            width: 80,
            height: 24,
            timestamp: Some(1_700_000_000),
            command: None,
            title: None,
            term: Some("xterm-256color".into()),
            shell: Some("/bin/bash".into()),
        }
    }

    #[test]
    fn writes_header_and_events_as_asciicast_v2() {
        let mut recorder = Recorder::new(&header());
        recorder.output(ms(1500), b"hello\r\n");
        recorder.input(ms(2000), b"ls\r");
        recorder.resize(ms(2250), 100, 30);
        recorder.marker(ms(3000), "denied: rm -rf /");
        let text = String::from_utf8(recorder.finish(ms(4000))).unwrap();
        assert_eq!(
            text,
            "{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1700000000,\
             \"env\":{\"SHELL\":\"/bin/bash\",\"TERM\":\"xterm-256color\"}}\n\
             [1.500000, \"o\", \"hello\\r\\n\"]\n\
             [2.000000, \"i\", \"ls\\r\"]\n\
             [2.250000, \"r\", \"100x30\"]\n\
             [3.000000, \"m\", \"denied: rm -rf /\"]\n"
        );
        let recording = Recording::parse(&text).unwrap();
        assert_eq!(recording.header, header());
        assert_eq!(recording.events.len(), 4);
        assert_eq!(
            recording.events[2].kind,
            EventKind::Resize {
                columns: 100,
                rows: 30
            }
        );
    }

    #[test]
    fn a_character_split_between_reads_is_kept_whole() {
        let euro = "€".as_bytes(); // three bytes
        for split in 1..euro.len() {
            let mut recorder = Recorder::new(&header());
            recorder.take_chunk();
            recorder.output(ms(1), &[b"a", &euro[..split]].concat());
            recorder.output(ms(2), &euro[split..]);
            let text = String::from_utf8(recorder.finish(ms(3))).unwrap();
            assert_eq!(text, "[0.001000, \"o\", \"a\"]\n[0.002000, \"o\", \"€\"]\n");
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_without_panicking() {
        let mut recorder = Recorder::new(&header());
        recorder.take_chunk();
        recorder.output(ms(1), b"a\xffb\xe2\x82");
        recorder.output(ms(2), b"c");
        recorder.output(ms(3), b"\xf0\x9f");
        let text = String::from_utf8(recorder.finish(ms(4))).unwrap();
        assert_eq!(
            text,
            "[0.001000, \"o\", \"a\u{fffd}b\"]\n[0.002000, \"o\", \"\u{fffd}c\"]\n\
             [0.004000, \"o\", \"\u{fffd}\"]\n"
        );
        // Every prefix of every split of a mixed byte string: never a panic, always JSON.
        let bytes = b"x\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xff\xc3\x1b[0m";
        for split in 0..=bytes.len() {
            let mut recorder = Recorder::new(&header());
            recorder.output(ms(1), &bytes[..split]);
            recorder.output(ms(2), &bytes[split..]);
            let text = String::from_utf8(recorder.finish(ms(3))).unwrap();
            let recording = Recording::parse(&text).unwrap();
            let shown: String = recording
                .events
                .iter()
                .map(|e| match &e.kind {
                    EventKind::Output(o) => o.as_str(),
                    _ => "",
                })
                .collect();
            assert_eq!(shown, String::from_utf8_lossy(bytes), "split at {split}");
        }
    }

    #[test]
    fn chunks_end_at_event_boundaries_and_time_never_goes_back() {
        let mut recorder = Recorder::new(&header());
        let mut all = recorder.take_chunk();
        recorder.output(ms(500), b"a");
        let chunk = recorder.take_chunk();
        assert!(chunk.ends_with(b"\n"));
        all.extend(chunk);
        recorder.output(ms(100), b"b");
        all.extend(recorder.finish(ms(0)));
        let recording = Recording::parse(std::str::from_utf8(&all).unwrap()).unwrap();
        let times: Vec<f64> = recording.events.iter().map(|e| e.time).collect();
        assert_eq!(times, vec![0.5, 0.5]);
    }

    fn sample() -> Recording {
        let mut recorder = Recorder::new(&header());
        recorder.output(ms(1000), b"one ");
        recorder.output(ms(11_000), b"two ");
        recorder.marker(ms(11_500), "denied");
        recorder.output(ms(12_000), b"three");
        Recording::parse(std::str::from_utf8(&recorder.finish(ms(13_000))).unwrap()).unwrap()
    }

    #[test]
    fn playback_scales_by_speed_and_shortens_idle_time() {
        let recording = sample();
        let waits = |options: PlayOptions| -> Vec<u64> {
            steps(&recording, &options)
                .unwrap()
                .iter()
                .map(|s| s.wait.as_millis() as u64)
                .collect()
        };
        assert_eq!(waits(PlayOptions::default()), vec![1000, 10_000, 1000]);
        let fast = PlayOptions {
            speed: 2.0,
            ..PlayOptions::default()
        };
        assert_eq!(waits(fast), vec![500, 5000, 500]);
        let idle = PlayOptions {
            idle_limit: Some(ms(2000)),
            ..PlayOptions::default()
        };
        assert_eq!(waits(idle), vec![1000, 2000, 1000]);
    }

    #[test]
    fn playback_can_start_at_a_marker() {
        let recording = sample();
        let options = PlayOptions {
            marker: Some(1),
            ..PlayOptions::default()
        };
        let steps = steps(&recording, &options).unwrap();
        let waits: Vec<u128> = steps.iter().map(|s| s.wait.as_millis()).collect();
        assert_eq!(waits, vec![0, 0, 500]);
        let mut screen = Vec::new();
        play(&recording, &options, &mut screen).unwrap();
        assert_eq!(screen, b"one two three");
        let missing = PlayOptions {
            marker: Some(2),
            ..PlayOptions::default()
        };
        assert!(matches!(
            play(&recording, &missing, &mut Vec::new()),
            Err(PlayError::NoSuchMarker { wanted: 2, have: 1 })
        ));
    }

    #[test]
    fn reading_reports_the_line_of_a_bad_event() {
        let text = "{\"version\":2,\"width\":80,\"height\":24}\n[1.0, \"o\", \"a\"]\n[oops]\n";
        let error = Recording::parse(text).unwrap_err();
        assert_eq!(
            error.to_string(),
            "line 3: not an event `[seconds, code, data]`: expected value at line 1 column 2"
        );
        assert!(matches!(
            Recording::parse("{\"version\":1,\"width\":80,\"height\":24}"),
            Err(ReadError::Version(1))
        ));
    }

    #[test]
    fn the_viewer_gets_every_wait_and_can_stop_playback() {
        let text = "{\"version\":2,\"width\":80,\"height\":24}\n[0.5, \"o\", \"a\"]\n[1.5, \"o\", \"b\"]\n[2.0, \"o\", \"c\"]\n";
        let recording = Recording::parse(text).unwrap();
        let mut waits = Vec::new();
        let mut out = Vec::new();
        play_with(&recording, &PlayOptions::default(), &mut out, |d| {
            waits.push(d);
            waits.len() < 3
        })
        .unwrap();
        assert_eq!(waits, [ms(500), ms(1000), ms(500)]);
        // Stopped at the third wait: "c" is never written.
        assert_eq!(out, b"ab");
    }
}
