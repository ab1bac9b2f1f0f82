//! The error of a `master.toml`: every problem found, each located by file,
//! line, column and key.

use std::fmt;
use std::path::PathBuf;

use nightshift_proto::diag::ConfigErrors;

/// One problem in a config file, located as precisely as known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `builder[0].workers[1]`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = issue.line {
                write!(f, ":{line}")?;
                if let Some(column) = issue.column {
                    write!(f, ":{column}")?;
                }
            }
            if issue.key.is_empty() {
                write!(f, ": {}", issue.message)?;
            } else {
                write!(f, ": {}: {}", issue.key, issue.message)?;
            }
        }
        Ok(())
    }
}

impl ConfigError {
    /// The located errors of a config file, as loaded by
    /// [`nightshift_proto::diag`].
    pub(super) fn from_diag(errors: &ConfigErrors) -> ConfigError {
        ConfigError {
            file: errors.file().to_path_buf(),
            issues: errors
                .errors()
                .iter()
                .map(|error| ConfigIssue {
                    line: error.line_column.map(|(line, _)| line),
                    column: error.line_column.map(|(_, column)| column),
                    key: error.path.clone(),
                    message: error.message.clone(),
                })
                .collect(),
        }
    }
}
