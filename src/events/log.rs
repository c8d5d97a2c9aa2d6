//! The JSON Lines audit log on disk: `<dir>/audit.jsonl`, rotated to `audit.jsonl.1`,
//! `audit.jsonl.2`, … (docs/audit-log.md).
//!
//! How it works:
//! 1. [`AuditLog::open`] opens `audit.jsonl` with `O_APPEND`, reads only the tail of the file (or
//!    of `audit.jsonl.1` when the current file is empty) to find the last id, and terminates a
//!    partial last line left by a crash so the next record starts on its own line.
//! 2. [`AuditLog::append`] writes a batch of whole lines, in one `write` unless the batch crosses
//!    the rotation threshold: then the lines that fit are written, the files are shifted
//!    (`audit.jsonl.N` -> `.N+1`, the current file -> `.1`, anything beyond `keep` removed) and
//!    the rest goes to a new file. It runs on the bus's writer thread only.
//! 3. [`LogReader`] replays the kept files in order (oldest first), one line at a time, skipping
//!    lines that do not parse. It is used from blocking threads only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Event;
use crate::config::AuditRetention;
use crate::error::{HiveError, Result};

/// File name of the current audit log.
pub const LOG_FILE: &str = "audit.jsonl";
/// File name of the most recent rotated audit log (older ones are `audit.jsonl.2`, …).
pub const ROTATED_FILE: &str = "audit.jsonl.1";
/// Default rotation threshold (docs/audit-log.md).
pub const ROTATE_BYTES: u64 = AuditRetention::DEFAULT_MAX_BYTES;

/// How much of a file's end is read at first to find its last id; doubled until a line is found.
const TAIL_WINDOW: u64 = 64 * 1024;

/// The writable audit log of one sandbox.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    path: PathBuf,
    retention: AuditRetention,
    /// `None` after a failed reopen; the next append tries again.
    file: Option<File>,
    size: u64,
}

/// `<dir>/audit.jsonl.<n>`.
fn rotated_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{LOG_FILE}.{n}"))
}

impl AuditLog {
    /// Opens `<dir>/audit.jsonl` (creating `dir` and the file) and returns it with the last
    /// sequence number found in the log (0 when there is none).
    pub fn open(dir: &Path, retention: AuditRetention) -> Result<(AuditLog, u64)> {
        fs::create_dir_all(dir)
            .map_err(|e| HiveError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(LOG_FILE);
        let rotated = rotated_path(dir, 1);
        let mut file = open_append(&path)
            .map_err(|e| HiveError::io(format!("opening {}", path.display()), e))?;
        let mut size = file
            .metadata()
            .map_err(|e| HiveError::io(format!("reading {}", path.display()), e))?
            .len();

        let mut last = last_seq_in(&path)
            .map_err(|e| HiveError::io(format!("reading {}", path.display()), e))?;
        if last.is_none() {
            last = match last_seq_in(&rotated) {
                Ok(seq) => seq,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(HiveError::io(format!("reading {}", rotated.display()), e)),
            };
        }

        // A crash mid-write can leave a partial last line; end it so it stays one malformed line
        // (skipped by replay) instead of swallowing the next record.
        if size > 0 && !ends_with_newline(&path)? {
            file.write_all(b"\n")
                .map_err(|e| HiveError::io(format!("writing {}", path.display()), e))?;
            size += 1;
        }

        let log = AuditLog {
            dir: dir.to_owned(),
            path,
            retention,
            file: Some(file),
            size,
        };
        Ok((log, last.unwrap_or(0)))
    }

    /// Changes the retention; it applies from the next write (extra old files go at the next
    /// rotation).
    pub fn set_retention(&mut self, retention: AuditRetention) {
        self.retention = retention;
    }

    /// Appends whole lines (the batch must end with `\n`), rotating where the threshold falls.
    /// One `write` unless the batch crosses the threshold.
    pub fn append(&mut self, mut batch: &[u8]) -> io::Result<()> {
        while !batch.is_empty() {
            let room = self.retention.max_bytes.saturating_sub(self.size);
            let mut take = if batch.len() as u64 <= room {
                batch.len()
            } else {
                // The whole lines that still fit.
                batch[..room as usize]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1)
            };
            if take == 0 {
                if self.size > 0 {
                    match self.rotate() {
                        Ok(()) => continue,
                        // A failed rotation must not lose events: keep appending to this file.
                        Err(e) => {
                            tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate audit log");
                            take = batch.len();
                        }
                    }
                } else {
                    // One line longer than the threshold gets a file of its own.
                    take = batch
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(batch.len(), |i| i + 1);
                }
            }
            self.write(&batch[..take])?;
            batch = &batch[take..];
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let file = open_append(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("audit log is not open"));
        };
        file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Shifts `audit.jsonl.N` to `.N+1` (dropping those beyond `keep`), the current file to `.1`
    /// (or removes it when `keep` is 0), and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.retention.keep;
        // `.keep` would become `.keep+1`, and files beyond `keep` may be left by a larger `keep`.
        for n in keep.max(1)..=AuditRetention::MAX_KEEP + 1 {
            remove_if_exists(&rotated_path(&self.dir, n))?;
        }
        for n in (1..keep).rev() {
            match fs::rename(rotated_path(&self.dir, n), rotated_path(&self.dir, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            fs::rename(&self.path, rotated_path(&self.dir, 1))?;
        }
        self.file = None;
        self.size = 0;
        let file = open_append(&self.path)?;
        self.file = Some(file);
        Ok(())
    }

    /// Opens the kept files for a replay. Called with the log's lock held so that no rotation can
    /// happen between the opens (which would make a replay skip or repeat a whole file).
    pub fn reader(&self) -> LogReader {
        let mut paths: Vec<PathBuf> = (1..=self.retention.keep)
            .rev()
            .map(|n| rotated_path(&self.dir, n))
            .collect();
        paths.push(self.path.clone());
        let mut files = Vec::with_capacity(paths.len());
        for path in &paths {
            match File::open(path) {
                Ok(file) => files.push(BufReader::new(file)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read audit log")
                }
            }
        }
        files.reverse();
        LogReader { files }
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A sequential reader over the rotated files (oldest first), then `audit.jsonl`.
#[derive(Debug)]
pub struct LogReader {
    /// Remaining files, the next one last.
    files: Vec<BufReader<File>>,
}

impl LogReader {
    /// The next event that parses, or `None` at the end of both files.
    pub fn next_event(&mut self) -> Option<Event> {
        let mut line = Vec::new();
        loop {
            let reader = self.files.last_mut()?;
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    self.files.pop();
                }
                Ok(_) => {
                    if let Some(event) = parse_line(&line) {
                        return Some(event);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read audit log");
                    self.files.pop();
                }
            }
        }
    }
}

/// Parses one persisted line; `None` for anything that is not a well-formed event.
pub fn parse_line(line: &[u8]) -> Option<Event> {
    let value: Value = serde_json::from_slice(line).ok()?;
    Event::from_json(value)
}

/// The sequence number of a stored id (`None` if it is not one of ours).
pub fn parse_seq(id: &str) -> Option<u64> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn ends_with_newline(path: &Path) -> Result<bool> {
    let read = || -> io::Result<bool> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::End(-1))?;
        let mut byte = [0u8; 1];
        file.read_exact(&mut byte)?;
        Ok(byte[0] == b'\n')
    };
    read().map_err(|e| HiveError::io(format!("reading {}", path.display()), e))
}

/// The last valid id's sequence number in `path`, reading only the file's tail (the window doubles
/// until it holds a complete valid line or the whole file).
fn last_seq_in(path: &Path) -> io::Result<Option<u64>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(&mut file)
            .take(len - start)
            .read_to_end(&mut buf)?;
        // The first piece is a partial line unless the window starts at the file's beginning.
        let mut lines: Vec<&[u8]> = buf.split(|b| *b == b'\n').collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        let found = lines
            .iter()
            .rev()
            .filter_map(|line| parse_line(line))
            .find_map(|event| parse_seq(&event.id));
        if found.is_some() || start == 0 {
            return Ok(found);
        }
        window = window.saturating_mul(2);
    }
}
