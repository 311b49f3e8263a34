// Workgroup reduction of the ACC accumulators with subgroupAdd: one shared-memory slot per
// subgroup and accumulator, then lane i < ACC adds the subgroups' partial sums of accumulator i.
// Assumes subgroups are consecutive ranges of local_invocation_index (as on Vulkan, Metal, D3D12
// for 1-D workgroups).
fn reduce(acc: ptr<function, array<f32, ACC>>, lid: u32, sg_lane: u32, sg_size: u32) -> f32 {
    let sg = lid / sg_size;
    for (var i = 0u; i < ACC; i++) {
        let s = subgroupAdd((*acc)[i]);
        if (sg_lane == 0u) {
            red[sg * ACC + i] = s;
        }
    }
    workgroupBarrier();
    var total = 0.0;
    if (lid < ACC) {
        let nsg = (WG + sg_size - 1u) / sg_size;
        for (var k = 0u; k < nsg; k++) {
            total += red[k * ACC + lid];
        }
    }
    return total;
}
