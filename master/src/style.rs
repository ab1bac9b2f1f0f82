//! The admin pages' one stylesheet (dashboard, build page, login), inlined
//! in each page: no external assets.

/// The pages' styles, inlined into every answer.
pub const STYLE: &str = include_str!("dashboard.css");
