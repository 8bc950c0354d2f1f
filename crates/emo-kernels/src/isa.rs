//! Runtime CPU feature detection and the one dispatch point.
//!
//! Kernels are written once as plain loops over slices and compiled three times by
//! `multiversion!`: for AVX-512, for AVX2+FMA (x86-64) and generic (any target, including
//! NEON on aarch64 through the baseline). The best level is detected once; `EMO_SIMD=generic|avx2|avx512`
//! forces a lower one (for testing and comparison).

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Generic = 1,
    Avx2 = 2,
    Avx512 = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU supports.
fn best() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Generic
}

/// The best level, lowered by `EMO_SIMD` if set.
fn detect() -> Level {
    let forced = match std::env::var("EMO_SIMD").as_deref() {
        Ok("generic") => Level::Generic,
        Ok("avx2") => Level::Avx2,
        _ => Level::Avx512,
    };
    best().min(forced)
}

thread_local! {
    static OVERRIDE: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Run `f` with kernels launched from this thread dispatching to `level` (tests, comparisons).
/// Panics if the CPU does not support `level`.
pub fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    assert!(available().contains(&level), "{level:?} is not supported by this CPU");
    let old = OVERRIDE.with(|o| o.replace(level as u8));
    let r = f();
    OVERRIDE.with(|o| o.set(old));
    r
}

/// [`with_level`] for a level already known to be supported (propagates the caller's level
/// into pool worker threads).
pub fn with_level_unchecked<R>(level: Level, f: impl FnOnce() -> R) -> R {
    let old = OVERRIDE.with(|o| o.replace(level as u8));
    let r = f();
    OVERRIDE.with(|o| o.set(old));
    r
}

fn from_u8(v: u8) -> Option<Level> {
    match v {
        1 => Some(Level::Generic),
        2 => Some(Level::Avx2),
        3 => Some(Level::Avx512),
        _ => None,
    }
}

/// The level kernels dispatch to.
pub fn level() -> Level {
    if let Some(l) = from_u8(OVERRIDE.with(|o| o.get())) {
        return l;
    }
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Generic,
        2 => Level::Avx2,
        3 => Level::Avx512,
        _ => {
            let l = detect();
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

/// The levels this CPU can run (for tests that check every path).
pub fn available() -> Vec<Level> {
    let best = best();
    [Level::Generic, Level::Avx2, Level::Avx512].into_iter().filter(|l| *l <= best).collect()
}

/// Define `fn $name(args)` (dispatching on [`level`]) and `fn $at(level, args)` from one body.
/// Helpers called from the body must be `#[inline(always)]` to pick up the target features.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $at:ident ($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(dead_code)]
        $vis fn $name($($arg: $ty),*) {
            $at($crate::isa::level(), $($arg),*)
        }
        /// Run at an explicit ISA level (must be supported by this CPU: see `isa::available`).
        $vis fn $at(level: $crate::isa::Level, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                match level {
                    // SAFETY: `level` is only ever a level the CPU supports (see `isa`).
                    $crate::isa::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::isa::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::isa::Level::Generic => {}
                }
            }
            #[allow(unused)]
            let _ = level;
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            generic($($arg),*)
        }
    };
}
