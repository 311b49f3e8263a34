// Workgroup reduction of the ACC accumulators without subgroup operations: a shared-memory
// tree (WG is a power of two). Lane i < ACC returns the sum of accumulator i.
fn reduce(acc: ptr<function, array<f32, ACC>>, lid: u32, sg_lane: u32, sg_size: u32) -> f32 {
    for (var i = 0u; i < ACC; i++) {
        red[i * WG + lid] = (*acc)[i];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var i = 0u; i < ACC; i++) {
                red[i * WG + lid] += red[i * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    var total = 0.0;
    if (lid < ACC) {
        total = red[lid * WG];
    }
    return total;
}
