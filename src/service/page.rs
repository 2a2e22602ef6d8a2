//! Page sizes for the list calls. The page tokens themselves are
//! keygate_core::page; a refused one is `Error::InvalidArgument` on
//! `page_token` (error.rs).

/// The page size asked for, 0 meaning the default of 100. Callers query one
/// more than this, to know whether another page follows.
pub fn page_size(asked: u32) -> u32 {
    if asked == 0 { 100 } else { asked }
}

/// Cuts a result fetched with `limit + 1` rows down to the page, and returns
/// the page's last item when another page follows.
pub fn last_of_page<T>(items: &mut Vec<T>, limit: u32) -> Option<&T> {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last()
    } else {
        None
    }
}
