//! [`indexed_enum!`]: a field-less enum whose values are the indexes `0..COUNT`, with the list of its values and,
//! where it names a metrics label or a config word, the label of each.
//!
//! Counters are arrays indexed by such enums (`stats.refused[Refusal::Limit as usize]`), the token layout packs a
//! [`crate::worker::token::Role`] into two bits, and the policy file spells a [`crate::policy::Command`] by its
//! label: the discriminants, the array sizes, the decode table and the label strings have to agree, so they are
//! all written once, here, from one list of variants.

/// Defines `enum NAME` with variants numbered from 0 in order, and on it `COUNT` and `ALL` (every value in
/// discriminant order). With `Variant => "label"` entries it also gets `LABELS` (in the same order) and
/// `label()`.
macro_rules! indexed_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+
        }
    ) => {
        $crate::indexed::indexed_enum! {
            $(#[$meta])*
            $vis enum $name {
                $($(#[$vmeta])* $variant,)+
            }
        }

        impl $name {
            /// The label of every value, in discriminant order.
            $vis const LABELS: [&'static str; Self::COUNT] = [$($label),+];

            /// This value's label.
            $vis fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// How many values there are (so arrays indexed by them have this length).
            $vis const COUNT: usize = [$($name::$variant),+].len();

            /// Every value, in discriminant order (`ALL[v as usize] == v`).
            $vis const ALL: [$name; Self::COUNT] = [$($name::$variant),+];
        }
    };
}

pub(crate) use indexed_enum;

#[cfg(test)]
mod tests {
    indexed_enum! {
        /// A test enum with labels.
        enum Colour {
            /// First.
            Red => "red",
            /// Second.
            DarkBlue => "dark_blue",
        }
    }

    #[test]
    fn indexes_and_labels_agree() {
        assert_eq!(Colour::COUNT, 2);
        for (i, c) in Colour::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i);
            assert_eq!(c.label(), Colour::LABELS[i]);
        }
        assert_eq!(Colour::DarkBlue.label(), "dark_blue");
    }
}
