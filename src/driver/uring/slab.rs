//! A worker's connections, by slot: the slot is in the user data of every
//! operation, with the slot's generation, so that a completion for a
//! connection that has since ended (and whose slot may hold another) is
//! told apart.
//!
//! The lowest free slot is taken first, and the slab gives back its tail
//! once that is free, so that after a spike it shrinks again: a free slot
//! costs a pointer, a connection its own allocation.

use std::collections::BTreeSet;

/// What a slot holds knows the generation it was made for.
pub trait Generation {
    fn generation(&self) -> u32;
}

pub struct Slab<T> {
    slots: Vec<Option<Box<T>>>,
    /// Free slots below the end.
    free: BTreeSet<u32>,
    /// Bumped each time a slot is taken (24 bits of it go in user data).
    generation: u32,
}

impl<T> Default for Slab<T> {
    fn default() -> Slab<T> {
        Slab {
            slots: Vec::new(),
            free: BTreeSet::new(),
            generation: 0,
        }
    }
}

impl<T: Generation> Slab<T> {
    /// Takes the lowest free slot for what `conn` makes of the slot's
    /// generation: its index and generation.
    pub fn insert(&mut self, conn: impl FnOnce(u32) -> T) -> (u32, u32) {
        self.generation = self.generation.wrapping_add(1) & 0xff_ffff;
        let index = match self.free.pop_first() {
            Some(index) => index,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[index as usize] = Some(Box::new(conn(self.generation)));
        (index, self.generation)
    }

    /// Connection `index`, unless it has ended (possibly earlier in this
    /// loop turn, by a step one completion led to).
    pub fn live(&mut self, index: u32) -> Option<&mut T> {
        self.slots.get_mut(index as usize)?.as_deref_mut()
    }

    /// Connection `index` if it is still the one of `generation`.
    pub fn of(&mut self, index: u32, generation: u32) -> Option<&mut T> {
        self.live(index)
            .filter(|conn| conn.generation() == generation)
    }

    /// Frees slot `index`, returning its connection; the tail of free
    /// slots is given back.
    pub fn remove(&mut self, index: u32) -> Box<T> {
        let conn = self.slots[index as usize]
            .take()
            .expect("a live connection");
        self.free.insert(index);
        while let Some(None) = self.slots.last() {
            self.slots.pop();
            self.free.remove(&(self.slots.len() as u32));
        }
        // Memory back after a spike, with room to grow again.
        if self.slots.capacity() > 64 && self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to(self.slots.len() * 2);
        }
        conn
    }

    /// One past the highest slot that may be taken.
    pub fn end(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Slots allocated, taken or not.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.slots.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Conn(u32);

    impl Conn {
        fn for_tests(generation: u32) -> Conn {
            Conn(generation)
        }
    }

    impl Generation for Conn {
        fn generation(&self) -> u32 {
            self.0
        }
    }

    #[test]
    fn the_lowest_slot_is_taken_and_the_tail_given_back() {
        let mut slab = Slab::default();
        let taken: Vec<u32> = (0..1000).map(|_| slab.insert(Conn::for_tests).0).collect();
        assert_eq!(taken, (0..1000).collect::<Vec<u32>>());
        let grown = slab.capacity();
        // A spike ends: all but slot 3 go, in any order.
        for index in (0..1000).rev().filter(|&i| i != 3) {
            drop(slab.remove(index));
        }
        assert_eq!(slab.end(), 4, "the free tail is given back");
        assert!(slab.capacity() < grown / 4, "and its memory");
        // The lowest free slots are taken again first.
        assert_eq!(slab.insert(Conn::for_tests).0, 0);
        assert_eq!(slab.insert(Conn::for_tests).0, 1);
        assert!(slab.live(3).is_some() && slab.live(999).is_none());
    }

    #[test]
    fn a_generation_tells_a_slot_taken_again() {
        let mut slab = Slab::default();
        let (index, first) = slab.insert(Conn::for_tests);
        drop(slab.remove(index));
        let (again, second) = slab.insert(Conn::for_tests);
        assert_eq!(index, again);
        assert!(slab.of(index, first).is_none());
        assert!(slab.of(index, second).is_some());
    }
}
